"""Leadership without Redis: the ``leader_lease`` row.

Owns taking, renewing and releasing a named lease held by one holder until it
expires — the database's stand-in for the Redis lock when no Redis is set.
"""

from __future__ import annotations

from sqlalchemy import or_, update

from scanqueue.db.engine import StoreBase
from scanqueue.db.schema import db_now_plus, leader_lease


class LeasesMixin(StoreBase):
    """The leadership lease row."""

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``holder``; False if someone else holds it."""
        with self._tx() as conn:
            if self.dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            else:
                from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
            conn.execute(dialect_insert(leader_lease).values(name=name).on_conflict_do_nothing())
            result = conn.execute(
                update(leader_lease)
                .where(
                    leader_lease.c.name == name,
                    or_(
                        leader_lease.c.holder == holder,
                        leader_lease.c.holder.is_(None),
                        leader_lease.c.expires_at < self._now,
                    ),
                )
                .values(
                    holder=holder,
                    expires_at=db_now_plus(self.dialect, ttl_s),
                    epoch=leader_lease.c.epoch + 1,
                )
            )
        return result.rowcount == 1

    def release_lease(self, name: str, holder: str) -> None:
        with self._tx() as conn:
            conn.execute(
                update(leader_lease)
                .where(leader_lease.c.name == name, leader_lease.c.holder == holder)
                .values(holder=None, expires_at=None)
            )
