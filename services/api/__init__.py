"""The REST API: validates requests and writes emails with their outbox rows."""
