"""infra/postgres."""
