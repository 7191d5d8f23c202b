"""kombu's SQLAlchemy transport, made usable as the embedded SQLite broker.

Two fixes over the stock transport, which otherwise passes every transport
option to ``create_engine``: ``polling_interval`` is accepted (the stock one
raises ``TypeError`` and polls every second, doubling pickup latency), and
SQLite files get WAL and a busy timeout so the worker and bridge processes can
share them.  Registered for the ``sqla+`` / ``sqlalchemy+`` URL prefixes by
:func:`register`; with other options it behaves exactly as the stock transport.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import create_engine, event

_NOT_ENGINE_OPTIONS = (
    "queue_tablename",
    "message_tablename",
    "callback",
    "errback",
    "max_retries",
    "interval_start",
    "interval_step",
    "interval_max",
    "retry_errors",
    "polling_interval",
)


class Channel(kombu_sqlalchemy.Channel):
    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        options = {
            k: v for k, v in conninfo.transport_options.items() if k not in _NOT_ENGINE_OPTIONS
        }
        if conninfo.hostname.startswith("sqlite"):
            options.setdefault("connect_args", {"timeout": 30})
        engine = create_engine(conninfo.hostname, **options)
        if conninfo.hostname.startswith("sqlite"):

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

        return engine


class Transport(kombu_sqlalchemy.Transport):
    Channel = Channel


def register() -> None:
    for alias in ("sqla", "sqlalchemy"):
        TRANSPORT_ALIASES[alias] = "scanqueue.broker_sqlite:Transport"
