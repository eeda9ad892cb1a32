"""Incidents: findings -> deduplicated incidents -> notifications through an outbox."""
