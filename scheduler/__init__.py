"""One scheduler across processes: a leader lease in the database; it only enqueues work."""
