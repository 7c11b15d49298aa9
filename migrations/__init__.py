"""Alembic revisions of the SQL log (see env.py); `homepage db upgrade` applies them."""
