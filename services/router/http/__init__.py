"""The router's OpenAI-compatible HTTP API (FastAPI): `create_app(gateway, jobs)`."""

from services.router.http.app import DEFAULT_MAX_BODY_BYTES, create_app

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]
