"""A run's own events written by its start and finish statements (PostgreSQL, events table).

Where events go to the ``scanqueue_events`` table of the database that holds
``scans`` (PostgreSQL without ``REDIS_URL``), a run's ``scan.started`` and its
``scan.completed`` / ``scan.failed`` need no writer of their own: the start and
finish statements insert them in the same statement, as River and Oban do
(docs/reference.md#events).  This module owns that: :class:`StatementEvents` (the
table's writer settings a worker passes in), wrapping a start or finish
``UPDATE … RETURNING`` into a data-modifying CTE that feeds an ``INSERT INTO
scanqueue_events``, and pruning after such a write as the table's sink does.

The rows are exactly those the background sender writes for the same events
(same type, ``scan_id`` and payload; ``at`` is the row's ``started_at`` or
``finished_at``), with two guards:

* Commit order must equal id order, or a reader that moved past a later id never
  sees an earlier one: every writer of the table holds the same transaction-level
  advisory lock while it takes ids, the statements too.  They wait for it at most
  :data:`LOCK_WAIT` (a statement-local ``lock_timeout``); past that the statement
  is run again without its event, which is left to the sender
  (:func:`lock_wait_ran_out`), so a stalled event writer never stalls a run for long.
* ``scan.started`` is written in SQL only for rows whose providers and frameworks
  are JSON arrays (or NULL), where SQL keeps exactly the strings Python would;
  any other row leaves it to the sender too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    Select,
    Update,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy.sql.elements import ColumnElement

from scanqueue.db.schema import STATUS_COMPLETED, events

# Longest a start or finish statement waits for the event writers' lock.  Past it the
# statement fails and runs again without its event, which the sender then writes: a
# stalled event writer costs a run this much at most.
LOCK_WAIT = "1s"


@dataclass(frozen=True)
class StatementEvents:
    """How the events table is written (the sink's settings): its writers' advisory
    lock key, and its retention (``maxlen`` rows, pruned every ``prune_every`` ids)."""

    lock_key: int
    maxlen: int
    prune_every: int

    def params(self) -> dict[str, Any]:
        return {"events_lock": self.lock_key}


# Only the strings of a JSON array, as RunInfo keeps them.
_STRINGS_PATH: ColumnElement[Any] = literal_column(
    """'strict $[*] ? (@.type() == "string")'::jsonpath"""
)


def _strings(column: Any) -> ColumnElement[Any]:
    return func.coalesce(
        func.jsonb_path_query_array(column, _STRINGS_PATH),
        literal_column("'[]'::jsonb"),
    )


def _array_or_null(column: Any) -> ColumnElement[bool]:
    return or_(column.is_(None), func.jsonb_typeof(column) == "array")


def _key(name: str) -> ColumnElement[Any]:
    return literal_column(f"'{name}'")


def _events_lock(*conditions: ColumnElement[bool]) -> Any:
    """A LATERAL row that takes the event writers' lock when ``conditions`` hold (on the
    row just started or finished), waiting at most :data:`LOCK_WAIT`.

    The statement-local ``lock_timeout`` is set in the lock's own FROM item, so it is
    in force before the lock is asked for (a target list is computed from its FROM
    row; neither subquery is flattened, both being volatile).
    """
    wait = select(
        func.set_config(literal_column("'lock_timeout'"), literal_column(f"'{LOCK_WAIT}'"), true())
    ).subquery("lock_wait")
    return (
        select(
            func.pg_advisory_xact_lock(bindparam("events_lock", type_=BigInteger)).label("taken")
        )
        .select_from(wait)
        .where(*conditions)
        .lateral("events_lock")
    )


def lock_wait_ran_out(exc: BaseException) -> bool:
    """Whether a statement failed on ``lock_timeout`` (SQLSTATE 55P03)."""
    return getattr(getattr(exc, "orig", None), "pgcode", None) == "55P03"


def with_started_event(start: Update) -> Select[Any]:
    """``start`` (an ``UPDATE scans … RETURNING`` of the started row) that also writes
    its ``scan.started``; selects the returned columns and ``event_id``."""
    started = start.cte("started")
    payload = func.jsonb_build_object(
        _key("attempt"),
        started.c.attempts,
        _key("providers"),
        _strings(started.c.providers_scanned),
        _key("frameworks"),
        _strings(started.c.frameworks_scanned),
    )
    lock = _events_lock(
        _array_or_null(started.c.providers_scanned),
        _array_or_null(started.c.frameworks_scanned),
    )
    written = (
        insert(events)
        .from_select(
            ["scan_id", "type", "at", "payload"],
            select(started.c.id, _key("scan.started"), started.c.started_at, payload)
            .select_from(started)
            .join(lock, true()),
        )
        .returning(events.c.id)
        .cte("written")
    )
    return select(*started.c, select(written.c.id).scalar_subquery().label("event_id"))


def with_finish_event(finish: Update) -> Select[Any]:
    """``finish`` (an ``UPDATE scans … RETURNING`` of the finished row, to
    ``completed`` or ``failed``) that also writes its ``scan.completed`` or
    ``scan.failed``, with the ``duration_s`` parameter; selects the returned columns
    and ``event_id``."""
    finished = finish.cte("finished")
    common = (
        _key("attempt"),
        finished.c.attempts,
        _key("status"),
        finished.c.status,
        _key("findings_count"),
        finished.c.findings_count,
        _key("duration_s"),
        bindparam("duration_s", type_=Float),
    )
    completed = finished.c.status == STATUS_COMPLETED
    payload = case(
        (
            completed,
            func.jsonb_build_object(
                *common,
                _key("findings_new"),
                finished.c.findings_new,
                _key("findings_fixed"),
                finished.c.findings_fixed,
            ),
        ),
        else_=func.jsonb_build_object(*common, _key("error"), finished.c.error),
    )
    event_type = case((completed, _key("scan.completed")), else_=_key("scan.failed"))
    written = (
        insert(events)
        .from_select(
            ["scan_id", "type", "at", "payload"],
            select(finished.c.id, event_type, finished.c.finished_at, payload)
            .select_from(finished)
            .join(_events_lock(finished.c.id.is_not(None)), true()),
        )
        .returning(events.c.id)
        .cte("written")
    )
    return select(*finished.c, select(written.c.id).scalar_subquery().label("event_id"))


def prune_statement(event_id: int, settings: StatementEvents) -> Any:
    """The table's pruning after ``event_id`` was written, or None when not due (the
    sink's rule: a written id that is a multiple of ``prune_every``, beyond ``maxlen``)."""
    if event_id % settings.prune_every != 0 or event_id <= settings.maxlen:
        return None
    return delete(events).where(events.c.id <= event_id - settings.maxlen)
