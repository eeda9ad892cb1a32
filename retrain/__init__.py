"""Retraining (next wave): jobs are queued on the retrain topic and recorded in the
``retrain_job`` and ``model_version`` tables, which exist from the Foundation on."""
