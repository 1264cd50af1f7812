"""`/v1/completion` endpoint: protocol and serving."""
