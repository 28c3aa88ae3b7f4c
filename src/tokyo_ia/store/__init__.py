"""Persistent state: SQLAlchemy models and Alembic migrations (SQLite default, PostgreSQL).

Storage is dumb on purpose; behaviour lives in services such as
:class:`tokyo_ia.security.keys.KeyService`.
"""

from .db import check_schema, create_engine, current_revision, head_revision, session_factory, upgrade
from .models import ApiKey, AuditEntry, Base

__all__ = [
    "ApiKey",
    "AuditEntry",
    "Base",
    "check_schema",
    "create_engine",
    "current_revision",
    "head_revision",
    "session_factory",
    "upgrade",
]
