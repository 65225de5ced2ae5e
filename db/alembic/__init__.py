"""Alembic environment and migration scripts of fedmq's database (see db.migrations)."""
