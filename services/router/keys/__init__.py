"""Authenticate: who is calling (the API key) and what it may touch (its scopes)."""

from services.router.keys.authenticator import KeyAuthenticator, credential_from, credential_from_metadata
from services.router.keys.scope import allowed_models, check_admin, check_model

__all__ = ["KeyAuthenticator", "allowed_models", "check_admin", "check_model", "credential_from",
           "credential_from_metadata"]
