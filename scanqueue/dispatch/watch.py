"""Wake-up sources for the bridge: "look at scans now".

A watcher only says *when* to look; it never says what is there.  So a lost
notification costs latency, never a scan: every (re)connect and every safety
poll is followed by a full look.

* :class:`PollWatcher` (SQLite): a fixed-rate ticker — ticks do not drift by
  the time the bridge spent working — that also wakes as soon as another
  connection commits to the database file
  (:class:`~scanqueue.db.sqlite_commits.CommitWatch`): another program's insert,
  a worker's start or finish.  The tick stays the guarantee.
* :class:`ListenWatcher` (PostgreSQL): ``LISTEN`` on the channel the
  migration's trigger notifies, on a dedicated autocommit connection, plus a
  safety poll.  Every ``liveness_every_s`` a ping ``NOTIFY`` is sent from a
  second connection and must arrive on the listening one within
  ``liveness_timeout_s``, or that connection is taken for half-open (or its
  backend for stuck) and replaced.  The ping goes through another connection
  because a query on a stalled one would block without end.  After any
  reconnect the watcher reports a wake-up so the bridge catches up on rows
  inserted meanwhile.

``wait(stop, timeout_s)`` also returns after ``timeout_s``: while its dispatch
window is full the bridge looks again soon whether or not a row was inserted,
because a scan *starting* frees room.  With a :class:`~scanqueue.dispatch.wake.StartSignal`
(the embedded bridge) such a wait also ends as soon as one of the worker's pool
processes started a scan; a standalone bridge has the timeout and, on SQLite, the
commit its workers' starts make (on PostgreSQL it polls: a start notifies nobody).
"""

from __future__ import annotations

import logging
import select
import threading
import time
import uuid
from typing import Any, Protocol

from scanqueue.config import mask_url
from scanqueue.db.schema import NOTIFY_CHANNEL
from scanqueue.db.sqlite_commits import CommitWatch
from scanqueue.dispatch.wake import StartSignal

log = logging.getLogger(__name__)

LIVENESS_EVERY_S = 10.0
LIVENESS_TIMEOUT_S = 5.0
RECONNECT_DELAY_MAX_S = 5.0
PING_PAYLOAD = "scanqueue-liveness"


class Watcher(Protocol):
    starts: int
    """Starts signalled when the last wait ended on the start signal alone; else 0."""
    notified: bool
    """The last wait ended on a notification that rows were inserted."""

    def wait(self, stop: threading.Event, timeout_s: float | None = None) -> bool:
        """Block until it is time to look (True; also after ``timeout_s``) or ``stop``
        is set (False)."""
        ...

    def forget_starts(self) -> None:
        """Drop the start signals pending: a claim about to run counts those starts."""
        ...

    def close(self) -> None: ...


class PollWatcher:
    """Ticks every ``interval_s`` on a fixed schedule; with ``commits``, also wakes
    when another connection commits to the database file."""

    def __init__(
        self,
        interval_s: float,
        start_signal: StartSignal | None = None,
        commits: CommitWatch | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.start_signal = start_signal
        self.commits = commits if commits is not None else CommitWatch(None)
        self.starts = 0
        self.notified = False  # polling hears of no insert
        self._next = time.monotonic()
        self._marked = False

    def wait(self, stop: threading.Event, timeout_s: float | None = None) -> bool:
        now = time.monotonic()
        self.starts = 0
        if not self._marked:
            self.commits.mark()
        if timeout_s is not None and now + timeout_s < self._next + self.interval_s:
            # An early look; the schedule stays.
            if self.start_signal is not None and not stop.is_set():
                self.starts = _wait_for_start(self.start_signal, timeout_s)
            else:
                self.commits.wait(stop, timeout_s)
            return self._look(stop)
        tick = self._next + self.interval_s
        if tick < now:  # fell behind (a long pass): restart the schedule, don't burst
            tick = now + self.interval_s
        if not self.commits.wait(stop, max(0.0, tick - now)):
            self._next = tick  # woken by a commit, the schedule stays
        return self._look(stop)

    def _look(self, stop: threading.Event) -> bool:
        """The file's version just before the bridge looks: a commit from then on,
        even one that lands during the look, wakes the next wait.  (The bridge's own
        commits during the look do too, once; the look after that writes nothing.)"""
        if stop.is_set():
            return False
        self.commits.mark()
        self._marked = True
        return True

    def forget_starts(self) -> None:
        if self.start_signal is not None:
            self.start_signal.drain()

    def close(self) -> None:
        self.commits.close()


class ListenWatcher:
    """LISTEN/NOTIFY with a safety poll, liveness pings and reconnects."""

    def __init__(
        self,
        database_url: str,
        safety_poll_s: float,
        *,
        channel: str = NOTIFY_CHANNEL,
        liveness_every_s: float = LIVENESS_EVERY_S,
        liveness_timeout_s: float = LIVENESS_TIMEOUT_S,
        start_signal: StartSignal | None = None,
    ) -> None:
        self.database_url = database_url
        self.start_signal = start_signal
        self.starts = 0
        self.notified = False
        self.safety_poll_s = safety_poll_s
        self.channel = channel
        self.liveness_every_s = liveness_every_s
        self.liveness_timeout_s = liveness_timeout_s
        self.reconnects = 0
        self._conn: Any = None
        self._ping_conn: Any = None
        self._ping_payload = ""
        self._last_poll = time.monotonic()
        self._ping_sent_at: float | None = None
        self._last_ping = time.monotonic()
        self._reconnect_delay = 0.5

    def _raw_connection(self, application_name: str, **options: Any) -> Any:
        import psycopg2
        from sqlalchemy.engine import make_url

        # libpq takes the URL itself once the SQLAlchemy driver suffix is gone.
        dsn = make_url(self.database_url).set(drivername="postgresql")
        conn = psycopg2.connect(
            dsn.render_as_string(hide_password=False),
            connect_timeout=5,
            application_name=application_name,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            **options,
        )
        conn.autocommit = True
        return conn

    def _send_ping(self) -> None:
        if self._ping_conn is None or self._ping_conn.closed:
            self._ping_conn = self._raw_connection(
                "scanqueue-listen-ping", options="-c statement_timeout=5000"
            )
        self._ping_payload = f"{PING_PAYLOAD}:{uuid.uuid4().hex[:12]}"
        with self._ping_conn.cursor() as cur:
            cur.execute("SELECT pg_notify(%s, %s)", (self.channel, self._ping_payload))

    def _connect(self) -> None:
        conn = self._raw_connection("scanqueue-listen")
        with conn.cursor() as cur:
            cur.execute(f'LISTEN "{self.channel}"')
        self._conn = conn
        self._ping_sent_at = None
        self._last_ping = time.monotonic()
        self._reconnect_delay = 0.5
        log.info("listening for new scans on %s", mask_url(self.database_url))

    def _drop(self, why: str) -> None:
        log.warning("LISTEN connection lost (%s); reconnecting", why)
        self.reconnects += 1
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # already broken; nothing to save
                log.debug("closing broken LISTEN connection failed", exc_info=True)
        self._conn = None

    def wait(self, stop: threading.Event, timeout_s: float | None = None) -> bool:
        import psycopg2

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.starts = 0
        self.notified = False
        while not stop.is_set():
            if self._conn is None:
                try:
                    self._connect()
                except psycopg2.Error as exc:
                    log.warning(
                        "cannot LISTEN on %s (retry in %.1fs): %s",
                        mask_url(self.database_url),
                        self._reconnect_delay,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                    )
                    if stop.wait(self._reconnect_delay):
                        return False
                    self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_DELAY_MAX_S)
                    continue
                return True  # (re)connected: look now, a NOTIFY may have been missed
            now = time.monotonic()
            try:
                if self._ping_sent_at is None and now - self._last_ping >= self.liveness_every_s:
                    try:
                        self._send_ping()
                    except psycopg2.Error as exc:
                        # Cannot ping at all: the listening side is suspect too.
                        self._close_ping()
                        raise exc
                    self._ping_sent_at = now
                if (
                    self._ping_sent_at is not None
                    and now - self._ping_sent_at > self.liveness_timeout_s
                ):
                    self._drop("liveness ping did not come back")
                    continue
                timeout = self._next_timeout(now)
                if deadline is not None:
                    timeout = min(timeout, max(0.0, deadline - now))
                watched: list[Any] = [self._conn]
                if deadline is not None and self.start_signal is not None:
                    watched.append(self.start_signal)  # the window is full: a start frees room
                readable, _, _ = select.select(watched, [], [], min(timeout, 0.5))
                if self.start_signal is not None and self.start_signal in readable:
                    # Rows inserted meanwhile are still pending on the connection: the
                    # next wait returns for them at once.
                    self.starts = self.start_signal.drain()
                    return True
                if readable:
                    self._conn.poll()
                    woke = self._drain()
                    if woke:
                        self._last_poll = time.monotonic()
                        self.notified = True
                        return True
                if time.monotonic() - self._last_poll >= self.safety_poll_s:
                    self._last_poll = time.monotonic()
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return True
            except (psycopg2.Error, OSError, ValueError) as exc:
                self._drop(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
        return False

    def forget_starts(self) -> None:
        if self.start_signal is not None:
            self.start_signal.drain()

    def _next_timeout(self, now: float) -> float:
        until_poll = self.safety_poll_s - (now - self._last_poll)
        if self._ping_sent_at is not None:
            until_ping = self.liveness_timeout_s - (now - self._ping_sent_at)
        else:
            until_ping = self.liveness_every_s - (now - self._last_ping)
        return max(0.0, min(until_poll, until_ping))

    def _drain(self) -> bool:
        woke = False
        while self._conn.notifies:
            note = self._conn.notifies.pop(0)
            if self._ping_payload and note.payload == self._ping_payload:
                self._ping_sent_at = None
                self._last_ping = time.monotonic()
            elif not note.payload.startswith(PING_PAYLOAD):
                woke = True
        return woke

    def _close_ping(self) -> None:
        if self._ping_conn is not None:
            try:
                self._ping_conn.close()
            except Exception:  # already broken
                log.debug("closing the ping connection failed", exc_info=True)
            self._ping_conn = None

    def close(self) -> None:
        self._close_ping()
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def _wait_for_start(signal: StartSignal, timeout_s: float) -> int:
    """Up to ``timeout_s``, ending early when a pool process started a scan; returns
    the starts signalled (0: the time ran out)."""
    try:
        readable, _, _ = select.select([signal], [], [], timeout_s)
    except (OSError, ValueError):  # closed at shutdown
        return 0
    return signal.drain() if readable else 0


def watcher_for(
    database_url: str, poll_every_s: float, start_signal: StartSignal | None = None
) -> Watcher:
    if database_url.startswith("postgresql"):
        return ListenWatcher(database_url, safety_poll_s=poll_every_s, start_signal=start_signal)
    return PollWatcher(
        poll_every_s, start_signal=start_signal, commits=CommitWatch.of_url(database_url)
    )
