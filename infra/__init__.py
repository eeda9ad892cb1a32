"""How genmon's local services start: a single-node Kafka (KRaft) and PostgreSQL on loopback."""
