"""The dashboard: server-rendered pages (Jinja), htmx actions, live updates over SSE."""
