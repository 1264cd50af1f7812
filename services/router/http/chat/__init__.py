"""`/v1/chat` endpoint: protocol and serving."""
