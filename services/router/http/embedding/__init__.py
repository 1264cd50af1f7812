"""`/v1/embedding` endpoint: protocol and serving."""
