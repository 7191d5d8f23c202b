"""Webhooks (docs/reference.md#webhooks): receivers, the durable outbox, and the
statements behind both.

Owns the statements on ``scanqueue_webhooks``, ``scanqueue_webhook_deliveries``
and ``scans.notified_at``: adding, listing and removing receivers, the fan-out,
claims and outcomes.  What a definition may be, the payload and the retry
schedule are :mod:`scanqueue.db.webhook_spec`; sending is above, in
:mod:`scanqueue.dispatch.webhooks`.

A delivery's life, one outbox row per (receiver, scan)::

    scan finished ──fan_out──▶ pending (next_attempt_at = now)
                                 │ claim: next_attempt_at = now + CLAIM_S, attempts + 1
                                 ▼
                              in flight ──2xx──▶ delivered (next_attempt_at NULL)
                                 │ error, timeout, non-2xx
                                 ├── attempts < MAX ──▶ pending (now + backoff)
                                 └── attempts = MAX ──▶ given up (next_attempt_at NULL)

The fan-out inserts outbox rows and marks the scans notified in one
transaction; ``INSERT … ON CONFLICT DO NOTHING`` on the unique (webhook_id,
scan_id) makes a second fan-out of the same scan (two leaders, a crash after
the insert) harmless.  A claim is a compare-and-set on ``attempts``, so
of two leaders one sends; a leader that dies mid-send leaves the claim to run
out after :data:`CLAIM_S`, and the row is sent again (at least once: receivers
deduplicate on ``X-Scanqueue-Delivery``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, select, update
from sqlalchemy import exc as sa_exc

from scanqueue.config import mask_url
from scanqueue.db.engine import StoreBase
from scanqueue.db.schema import (
    FINISHED_STATUSES,
    db_now_plus,
    scans,
    webhook_deliveries,
    webhooks,
)
from scanqueue.db.webhook_spec import (
    CLAIM_S,
    FANOUT_BATCH,
    MAX_DELIVERY_ATTEMPTS,
    MAX_ERROR_CHARS,
    DueDelivery,
    WebhookRow,
    WebhookSpec,
    build_payload,
    delivery_id_for,
    retry_delay_s,
)
from scanqueue.errors import ConflictError, NotFoundError


def _wants(hook: Mapping[Any, Any], scan: Mapping[Any, Any]) -> bool:
    if scan["status"] not in str(hook["events"]).split(","):
        return False
    # A row written finished without a finished_at finished when it was written.
    finished = scan["finished_at"] or scan["created_at"]
    if finished is not None and hook["created_at"] is not None and finished < hook["created_at"]:
        return False  # finished before the webhook existed: no history flood
    return not hook["only_new_findings"] or (scan.get("findings_new") or 0) > 0


_PAYLOAD_COLUMNS = (
    scans.c.id,
    scans.c.status,
    scans.c.effective_key,
    scans.c.findings_count,
    scans.c.findings_new,
    scans.c.findings_fixed,
    scans.c.baseline_id,
    scans.c.error,
    scans.c.providers_scanned,
    scans.c.frameworks_scanned,
    scans.c.triggered_by_user,
    scans.c.created_at,
    scans.c.started_at,
    scans.c.finished_at,
)


class WebhooksMixin(StoreBase):
    """Receivers, the fan-out into the outbox, and claiming and recording deliveries."""

    def add_webhook(self, spec: WebhookSpec) -> WebhookRow:
        """Insert a receiver; ConflictError when one with that URL exists."""
        try:
            with self._tx(single=True) as conn:
                row = conn.execute(
                    insert(webhooks)
                    .values(
                        url=spec.url,
                        secret=spec.secret,
                        events=",".join(spec.events),
                        only_new_findings=spec.only_new_findings,
                    )
                    .returning(webhooks.c.id)
                ).one()
        except sa_exc.IntegrityError:
            raise ConflictError(f"a webhook for {mask_url(spec.url)} exists already") from None
        return self._webhook(int(row[0]))

    def list_webhooks(self) -> list[WebhookRow]:
        """Every receiver, oldest first, with its deliveries counted."""
        d = webhook_deliveries.c
        counts = (
            select(
                d.webhook_id,
                func.sum(case((d.delivered_at.is_not(None), 1), else_=0)).label("delivered"),
                func.sum(case((d.next_attempt_at.is_not(None), 1), else_=0)).label("pending"),
                func.sum(
                    case((and_(d.delivered_at.is_(None), d.next_attempt_at.is_(None)), 1), else_=0)
                ).label("given_up"),
            )
            .group_by(d.webhook_id)
            .subquery()
        )
        with self._tx(single=True) as conn:
            rows = conn.execute(
                select(
                    webhooks.c.id,
                    webhooks.c.url,
                    webhooks.c.events,
                    webhooks.c.only_new_findings,
                    webhooks.c.created_at,
                    counts.c.delivered,
                    counts.c.pending,
                    counts.c.given_up,
                )
                .outerjoin(counts, counts.c.webhook_id == webhooks.c.id)
                .order_by(webhooks.c.id)
            ).all()
        return [
            WebhookRow(
                id=int(r.id),
                url=r.url,
                events=tuple(e for e in str(r.events).split(",") if e),
                only_new_findings=bool(r.only_new_findings),
                created_at=r.created_at,
                pending=int(r.pending or 0),
                delivered=int(r.delivered or 0),
                given_up=int(r.given_up or 0),
            )
            for r in rows
        ]

    def _webhook(self, webhook_id: int) -> WebhookRow:
        for row in self.list_webhooks():
            if row.id == webhook_id:
                return row
        raise NotFoundError(f"no webhook with id {webhook_id}")

    def remove_webhook(self, url: str | None = None, webhook_id: int | None = None) -> WebhookRow:
        """Delete a receiver (by URL or id) and its outbox rows; NotFoundError if none."""
        where = webhooks.c.url == url if url is not None else webhooks.c.id == webhook_id
        found = [
            w
            for w in self.list_webhooks()
            if (url is not None and w.url == url) or (url is None and w.id == webhook_id)
        ]
        what = mask_url(url) if url is not None else f"id {webhook_id}"
        if not found:
            raise NotFoundError(f"no webhook for {what}")
        with self._tx() as conn:
            conn.execute(
                delete(webhook_deliveries).where(webhook_deliveries.c.webhook_id == found[0].id)
            )
            if not conn.execute(delete(webhooks).where(where)).rowcount:
                raise NotFoundError(f"no webhook for {what}")
        return found[0]

    # -- the leader: fan-out, claims, outcomes ----------------------------------------

    def fan_out(self, limit: int = FANOUT_BATCH) -> tuple[int, int]:
        """Put up to ``limit`` finished, not yet notified scans into the outbox.

        Returns (scans marked notified, outbox rows made).  One transaction: the
        rows and the marks commit together, and a repeat inserts nothing twice.
        Only scans some webhook could want are read and marked: those that finished
        (or, without a ``finished_at``, were written) since the oldest webhook was
        added.  With no webhook nothing is read or written, so a finished scan costs
        no second write while nobody listens, and the scans from before a webhook
        (never sent: :func:`_wants`) are never read.
        """
        with self._tx() as conn:
            hooks = [
                r._mapping
                for r in conn.execute(
                    select(
                        webhooks.c.id,
                        webhooks.c.events,
                        webhooks.c.only_new_findings,
                        webhooks.c.created_at,
                    )
                ).all()
            ]
            if not hooks:
                return 0, 0
            since = min(hook["created_at"] for hook in hooks)
            unnotified = (scans.c.status.in_(FINISHED_STATUSES), scans.c.notified_at.is_(None))
            # A range of scans_unnotified_idx, in finish order.
            found = list(
                conn.execute(
                    select(*_PAYLOAD_COLUMNS)
                    .where(*unnotified, scans.c.finished_at >= since)
                    .order_by(scans.c.finished_at)
                    .limit(limit)
                ).all()
            )
            if len(found) < limit:
                # Rows another program wrote finished without a finished_at: the same
                # index's NULL end, each read once (marked here, wanted or not).
                found += conn.execute(
                    select(*_PAYLOAD_COLUMNS)
                    .where(*unnotified, scans.c.finished_at.is_(None))
                    .order_by(scans.c.created_at)
                    .limit(limit - len(found))
                ).all()
            if not found:
                return 0, 0
            outbox: list[dict[str, Any]] = []
            for scan_row in found:
                scan = scan_row._mapping
                for hook in hooks:
                    if _wants(hook, scan):
                        delivery_id = delivery_id_for(int(hook["id"]), scan["id"])
                        outbox.append(
                            {
                                "webhook_id": int(hook["id"]),
                                "scan_id": scan["id"],
                                "delivery_id": delivery_id,
                                "payload": build_payload(scan, delivery_id),
                                "next_attempt_at": None,
                            }
                        )
            made = 0
            if outbox:
                if self.dialect == "postgresql":
                    from sqlalchemy.dialects.postgresql import insert as dialect_insert
                else:
                    from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
                for row in outbox:
                    row["next_attempt_at"] = self._now
                made = conn.execute(
                    dialect_insert(webhook_deliveries).values(outbox).on_conflict_do_nothing()
                ).rowcount
            conn.execute(
                update(scans)
                .where(scans.c.id.in_([r.id for r in found]), scans.c.notified_at.is_(None))
                .values(notified_at=self._now)
            )
        return len(found), max(made, 0)

    def claim_due_deliveries(self, limit: int, claim_s: float = CLAIM_S) -> list[DueDelivery]:
        """Claim up to ``limit`` due outbox rows (compare-and-set on ``next_attempt_at``)."""
        if limit <= 0:
            return []
        d = webhook_deliveries.c
        with self._tx(single=True) as conn:
            due = conn.execute(
                select(
                    d.id,
                    d.delivery_id,
                    d.webhook_id,
                    d.scan_id,
                    d.payload,
                    d.attempts,
                    webhooks.c.url,
                    webhooks.c.secret,
                )
                .join(webhooks, webhooks.c.id == d.webhook_id)
                .where(d.next_attempt_at.is_not(None), d.next_attempt_at <= self._now)
                .order_by(d.next_attempt_at)
                .limit(limit)
            ).all()
        claimed: list[DueDelivery] = []
        for row in due:
            with self._tx(single=True) as conn:
                won = conn.execute(
                    update(webhook_deliveries)
                    # attempts, not the timestamp: SQLite keeps times as text, and a
                    # datetime read back does not compare equal to the stored string.
                    .where(
                        d.id == row.id,
                        d.attempts == row.attempts,
                        d.next_attempt_at.is_not(None),
                        d.next_attempt_at <= self._now,
                    )
                    .values(
                        next_attempt_at=db_now_plus(self.dialect, claim_s),
                        attempts=d.attempts + 1,
                    )
                ).rowcount
            if won == 1:
                claimed.append(
                    DueDelivery(
                        id=int(row.id),
                        delivery_id=row.delivery_id,
                        webhook_id=int(row.webhook_id),
                        scan_id=row.scan_id,
                        url=row.url,
                        secret=row.secret,
                        payload=row.payload,
                        attempts=int(row.attempts) + 1,
                    )
                )
        return claimed

    def record_delivery(
        self,
        delivery: DueDelivery,
        error: str | None,
        *,
        max_attempts: int = MAX_DELIVERY_ATTEMPTS,
        retry_in_s: float | None = None,
    ) -> str:
        """Record one try: ``error`` None means delivered.

        Returns ``delivered``, ``retry`` (due again after ``retry_in_s``, default
        :func:`retry_delay_s`) or ``given_up`` (``max_attempts`` tries failed).
        """
        d = webhook_deliveries.c
        if error is None:
            values: dict[str, Any] = {
                "delivered_at": self._now,
                "next_attempt_at": None,
                "last_error": None,
            }
            outcome = "delivered"
        elif delivery.attempts >= max_attempts:
            values = {
                "next_attempt_at": None,
                "last_error": f"gave up after {delivery.attempts} attempts: {error}"[
                    :MAX_ERROR_CHARS
                ],
            }
            outcome = "given_up"
        else:
            delay = retry_delay_s(delivery.attempts) if retry_in_s is None else retry_in_s
            values = {
                "next_attempt_at": db_now_plus(self.dialect, delay),
                "last_error": error[:MAX_ERROR_CHARS],
            }
            outcome = "retry"
        with self._tx(single=True) as conn:
            conn.execute(
                update(webhook_deliveries)
                # Only this try's claim: a row sent again elsewhere after our claim ran
                # out (or delivered meanwhile) keeps that outcome.
                .where(
                    d.id == delivery.id,
                    d.attempts == delivery.attempts,
                    d.delivered_at.is_(None),
                )
                .values(**values)
            )
        return outcome

    def deliveries_of(self, scan_id: str | None = None) -> list[dict[str, Any]]:
        """Outbox rows (for tests and operators), oldest first; never the secret."""
        d = webhook_deliveries.c
        query = select(
            d.id,
            d.webhook_id,
            d.scan_id,
            d.delivery_id,
            d.attempts,
            d.next_attempt_at,
            d.delivered_at,
            d.last_error,
        ).order_by(d.id)
        if scan_id is not None:
            query = query.where(d.scan_id == scan_id)
        with self._tx(single=True) as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def pending_deliveries(self) -> int:
        with self._tx(single=True) as conn:
            return int(
                conn.execute(
                    select(func.count()).where(webhook_deliveries.c.next_attempt_at.is_not(None))
                ).scalar_one()
            )
