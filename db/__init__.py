"""fedmq's durable state: SQLAlchemy models, sessions, queries, the blob store, migrations.

- ``db.engine``: ``make_engine(url)``, ``session_scope(engine)``; nothing at import time.
- ``db.models``: the tables and their state enums.
- ``db.queries``: every query (plain functions taking a Session; nobody else writes SQL).
- ``db.blobstore``: content-addressed, chunked blobs (models and updates).
- ``db.migrations``: ``upgrade`` / ``downgrade`` / ``current`` (alembic, no ini needed).
"""
