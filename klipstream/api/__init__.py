"""The HTTP API: one module per concern, gathered into one route table (klipstream.api.routes)."""
