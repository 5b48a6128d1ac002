"""Collector storage: SQLAlchemy Core over SQLite (default) or PostgreSQL."""
