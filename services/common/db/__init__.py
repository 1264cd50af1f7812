"""Database access shared by the services: models, engine, migrations."""

from services.common.db.engine import make_engine, make_sessionmaker
from services.common.db.models import (
    ApiKey,
    Asset,
    AssetAlias,
    Base,
    Operation,
    OutboxEvent,
)

__all__ = [
    "ApiKey",
    "Asset",
    "AssetAlias",
    "Base",
    "Operation",
    "OutboxEvent",
    "make_engine",
    "make_sessionmaker",
]
