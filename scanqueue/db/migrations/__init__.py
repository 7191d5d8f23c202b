"""Alembic migrations for scanqueue's tables (run by ``scanqueue db upgrade``)."""
