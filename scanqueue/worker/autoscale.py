"""Queue-depth-aware autoscaling for ``celery -A scanqueue worker --autoscale=MAX,MIN``.

Celery's stock autoscaler sizes the pool from the messages this worker has
already reserved, which with a small prefetch hides the real backlog.  This one
(the ``worker_autoscaler`` setting) follows the old Go pool instead:

* **grow** when the backlog — scans waiting, read from the database (rows
  ``queued``) or from the broker queue — stays above a threshold for a
  sustained period while every process of this worker has a scan; it grows by
  the excess, up to MAX, then waits another period before growing again;
* **grow at once** when, with every process busy, the excess is at least
  ``SURGE`` times this worker's processes (4 by default): a burst gets the
  processes it needs (up to MAX) without waiting the period, while a blip on a
  small queue still has to last it;
* **shrink** processes that were not needed for Celery's ``AUTOSCALE_KEEPALIVE``
  seconds (default 30), down to the most this worker needed in that time, never
  below MIN.

Three rules keep it safe:

* the backlog is read by a sampler thread, never on the worker's event loop;
  an empty or missing broker queue is 0, and a sample that failed or went stale
  counts as 0 too, never as the last value seen;
* it never shrinks while a reserved scan has not been accepted by a pool
  process yet, nor within a moment of a scan arriving (celery#7266: a process
  that was just handed a task looks idle and can be terminated with it); it ends
  only live processes with no job that are not ending already
  (:func:`shrink_idle_processes`, not billiard's ``Pool.shrink``);
* the decision is :func:`decide`, a pure function of a :class:`Sample` and the
  previous :class:`ScaleState`, so it is tested without a worker.

Cadence: the backlog is sampled every ``SAMPLE_EVERY`` seconds, sharing a count
made within the last second by the bridge in the same process.  While this worker
holds scans it has no process for and is below MAX, a decision asks the sampler
for a fresh count instead, at most every :data:`PROMPT_SAMPLE_S`, so a burst is
seen within a fraction of a second rather than after a sampling period.
Decisions come every ``TICK`` seconds, on every message on the Redis/AMQP event
loop, and (the embedded SQLite broker's autoscaler thread) right after each
sample.

Settings (environment; a bad value stops the worker with one line naming it):

==================================  ========  =============================================
``SCANQUEUE_AUTOSCALE_SOURCE``      ``db``    ``db`` (queued rows) or ``broker`` (queue length)
``SCANQUEUE_AUTOSCALE_THRESHOLD``   ``0``     waiting scans tolerated before growing
``SCANQUEUE_AUTOSCALE_GROW_AFTER``  ``1``     seconds the backlog must stay above it
``SCANQUEUE_AUTOSCALE_SURGE``       ``4``     grow at once when the excess is this many
                                              times the processes (0: never)
``SCANQUEUE_AUTOSCALE_SAMPLE_EVERY`` ``1``    seconds between backlog samples
``SCANQUEUE_AUTOSCALE_TICK``        ``0.25``  seconds between decisions
``AUTOSCALE_KEEPALIVE``             ``30``    Celery's: seconds a surplus must last before
                                              shrinking (also the shrink cooldown)
==================================  ========  =============================================

Celery's event loop calls the autoscaler every ``keepalive`` seconds, so this
class sets ``keepalive`` to the decision tick and keeps Celery's
``AUTOSCALE_KEEPALIVE`` as :attr:`QueueDepthAutoscaler.idle_keepalive_s`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from time import monotonic
from typing import Any

from celery.worker import autoscale as celery_autoscale
from celery.worker import state as worker_state

from scanqueue.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("db", "broker")
DEFAULT_SOURCE = "db"
DEFAULT_THRESHOLD = 0
DEFAULT_GROW_AFTER_S = 1.0
DEFAULT_SURGE_FACTOR = 4.0
DEFAULT_SAMPLE_EVERY_S = 1.0
DEPTH_MAX_AGE_S = 1.0  # a queue-depth count this recent (the bridge's) is reused
# While scans wait in this worker and it could grow, each decision asks for a fresh
# count (not a shared one), at most once per this many seconds.
PROMPT_SAMPLE_S = 0.25
DEFAULT_TICK_S = 0.25
# After a scan arrives, leave the pool alone this long even if the request looks
# accepted: belt and braces for celery#7266.
RECEIVE_GUARD_S = 2.0
STALE_AFTER_SAMPLES = 3  # a sample older than this many periods counts as 0


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoscaleConfig:
    source: str = DEFAULT_SOURCE
    threshold: int = DEFAULT_THRESHOLD
    grow_after_s: float = DEFAULT_GROW_AFTER_S
    sample_every_s: float = DEFAULT_SAMPLE_EVERY_S
    tick_s: float = DEFAULT_TICK_S
    surge_factor: float = DEFAULT_SURGE_FACTOR

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AutoscaleConfig:
        env = os.environ if environ is None else environ
        source = (env.get("SCANQUEUE_AUTOSCALE_SOURCE", "").strip() or DEFAULT_SOURCE).lower()
        if source not in SOURCES:
            raise ConfigError(
                "SCANQUEUE_AUTOSCALE_SOURCE", f"expected 'db' or 'broker', got {source!r}"
            )
        return cls(
            source=source,
            threshold=int(
                _number(env, "SCANQUEUE_AUTOSCALE_THRESHOLD", DEFAULT_THRESHOLD, 0, True)
            ),
            grow_after_s=_number(env, "SCANQUEUE_AUTOSCALE_GROW_AFTER", DEFAULT_GROW_AFTER_S, 0),
            sample_every_s=_number(
                env, "SCANQUEUE_AUTOSCALE_SAMPLE_EVERY", DEFAULT_SAMPLE_EVERY_S, 0.05
            ),
            tick_s=_number(env, "SCANQUEUE_AUTOSCALE_TICK", DEFAULT_TICK_S, 0.05),
            surge_factor=_number(env, "SCANQUEUE_AUTOSCALE_SURGE", DEFAULT_SURGE_FACTOR, 0),
        )


def _number(
    env: Mapping[str, str], name: str, default: float, minimum: float, whole: bool = False
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(int(raw)) if whole else float(raw)
    except ValueError:
        kind = "a whole number" if whole else "a number of seconds"
        raise ConfigError(name, f"expected {kind}, got {raw!r}") from None
    if not minimum <= value < float("inf"):  # also rejects NaN
        raise ConfigError(name, f"must be a finite number of at least {minimum:g}, got {raw!r}")
    return value


# -- the decision -------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    min_processes: int
    max_processes: int
    threshold: int = DEFAULT_THRESHOLD
    grow_after_s: float = DEFAULT_GROW_AFTER_S
    keepalive_s: float = 30.0
    receive_guard_s: float = RECEIVE_GUARD_S
    surge_factor: float = DEFAULT_SURGE_FACTOR  # 0: always wait grow_after_s


@dataclass(frozen=True)
class Sample:
    """What the worker looks like at ``now`` (monotonic seconds)."""

    now: float
    processes: int
    reserved: int  # requests this worker holds: running, being handed over, or waiting
    active: int  # of those, the ones a pool process has accepted
    backlog: int  # scans waiting for a process (0 when unknown)
    last_received: float | None = None


@dataclass(frozen=True)
class ScaleState:
    pressure_since: float | None = None  # backlog above threshold, pool saturated, since
    surplus_since: float | None = None  # more processes than needed, since
    needed_peak: int = 0  # most processes needed since surplus_since
    last_change: float | None = None


@dataclass(frozen=True)
class Decision:
    delta: int  # > 0 grow, < 0 shrink, 0 leave
    reason: str
    state: ScaleState


def decide(policy: Policy, state: ScaleState, sample: Sample) -> Decision:
    """How many processes to add (or remove) now, and the state to remember."""
    now, procs = sample.now, sample.processes
    low, high = policy.min_processes, max(policy.min_processes, policy.max_processes)

    if procs < low:
        return Decision(low - procs, "below the minimum", ScaleState(last_change=now))

    saturated = sample.reserved >= procs
    excess = sample.backlog - policy.threshold
    if excess > 0 and saturated:
        since = state.pressure_since if state.pressure_since is not None else now
        surge = policy.surge_factor > 0 and excess >= policy.surge_factor * procs
        if procs < high and (surge or now - since >= policy.grow_after_s):
            grow = min(high - procs, excess)
            if surge:
                reason = (
                    f"backlog {sample.backlog} above {policy.threshold} by "
                    f"{policy.surge_factor:g}x or more the {procs} processes, every one busy"
                )
            else:
                reason = (
                    f"backlog {sample.backlog} above {policy.threshold} "
                    f"for {now - since:.1f}s with every process busy"
                )
            return Decision(grow, reason, ScaleState(pressure_since=now, last_change=now))
        return Decision(0, "backlog building", replace(state, pressure_since=since))
    state = replace(state, pressure_since=None)

    needed = max(low, min(sample.reserved, high))
    if needed >= procs:
        return Decision(
            0, "every process needed", replace(state, surplus_since=None, needed_peak=0)
        )
    since = state.surplus_since if state.surplus_since is not None else now
    peak = max(needed, state.needed_peak if state.surplus_since is not None else 0)
    state = replace(state, surplus_since=since, needed_peak=peak)
    quiet = now - since >= policy.keepalive_s and (
        state.last_change is None or now - state.last_change >= policy.keepalive_s
    )
    if not quiet:
        return Decision(0, "surplus not idle for keepalive yet", state)
    if sample.reserved > sample.active:
        return Decision(0, "a scan is being handed to a process", state)
    if sample.last_received is not None and now - sample.last_received < policy.receive_guard_s:
        return Decision(0, "a scan just arrived", state)
    if peak >= procs:
        return Decision(0, "every process needed", state)
    reason = f"only {peak} of {procs} processes needed for {now - since:.1f}s"
    return Decision(peak - procs, reason, ScaleState(last_change=now))


# -- sampling -----------------------------------------------------------------------------


# Reads the backlog; the argument is how old a count made by this process may be.
BacklogReader = Callable[[float], int | None]


class BacklogSampler:
    """Reads the backlog every ``every_s`` seconds in a daemon thread, sooner on request.

    A scheduled sample accepts a count up to :data:`DEPTH_MAX_AGE_S` old (shared
    with the bridge); a requested one (:meth:`request`) counts afresh.
    ``on_sample`` is called after each attempt, from the sampler's thread.
    """

    def __init__(
        self,
        read: BacklogReader,
        every_s: float,
        what: str,
        on_sample: Callable[[], None] | None = None,
    ) -> None:
        self.read = read
        self.every_s = every_s
        self.what = what
        self.on_sample = on_sample
        self._latest: tuple[int, float] | None = None
        self._fresh_at: float | None = None  # the last requested read's end
        self._reading = False
        self._requested = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def sample_once(self, max_age_s: float = DEPTH_MAX_AGE_S) -> None:
        self._reading = True
        try:
            self._read(max_age_s)
        finally:
            if max_age_s <= 0:
                self._fresh_at = monotonic()
            self._reading = False
        if self.on_sample is not None:
            self.on_sample()

    def _read(self, max_age_s: float) -> None:
        try:
            value = self.read(max_age_s)
        except Exception as exc:
            # Unknown is not "as before": a stale depth would keep growing the pool.
            self._latest = None
            if not self._failing:
                log.warning("autoscale: cannot read the backlog from the %s: %s", self.what, exc)
            self._failing = True
            return
        if self._failing:
            log.info("autoscale: reading the backlog from the %s again", self.what)
        self._failing = False
        self._latest = (max(0, int(value or 0)), monotonic())

    def request(self, now: float, older_than_s: float) -> bool:
        """Ask the thread for a fresh count now; return whether it was asked.

        Not while a read is under way, nor within ``older_than_s`` of the last fresh
        count (a scheduled sample may have shared one a second old).
        """
        fresh = self._fresh_at
        if self._reading or (fresh is not None and now - fresh < older_than_s):
            return False
        self._requested = True
        self._wake.set()
        return True

    def latest(self, now: float) -> int:
        latest = self._latest
        if latest is None or now - latest[1] > STALE_AFTER_SAMPLES * self.every_s:
            return 0
        return latest[0]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="scanqueue-autoscale-sampler", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            requested, self._requested = self._requested, False
            self.sample_once(0.0 if requested else DEPTH_MAX_AGE_S)
            self._wake.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)


def backlog_reader(source: str) -> BacklogReader:
    from scanqueue.worker.app import app, settings

    if source == "broker":
        from scanqueue.dispatch.service import make_broker_depth

        broker_depth: Callable[[], int | None] = make_broker_depth(app)
        return lambda _max_age_s: broker_depth()
    from scanqueue.db.store import store_for

    store = store_for(settings.database_url)

    def depth(max_age_s: float) -> int:
        # Shared with the embedded bridge's gauge: one count per interval per process.
        return store.queue_depth(max_age_s=max_age_s)

    return depth


# -- the Celery autoscaler ----------------------------------------------------------------


class QueueDepthAutoscaler(celery_autoscale.Autoscaler):  # type: ignore[misc]
    """Celery's ``worker_autoscaler``: grows with the backlog, shrinks after keepalive."""

    def __init__(
        self,
        pool: Any,
        max_concurrency: int,
        min_concurrency: int = 0,
        worker: Any = None,
        keepalive: float | None = None,
        mutex: Any = None,
        config: AutoscaleConfig | None = None,
        read_backlog: BacklogReader | None = None,
    ) -> None:
        if config is None:
            try:
                config = AutoscaleConfig.from_env()
            except ConfigError as exc:
                print(f"scanqueue: {exc}", file=sys.stderr)
                raise SystemExit(1) from None
        super().__init__(
            pool,
            max_concurrency,
            min_concurrency,
            worker=worker,
            keepalive=config.tick_s,
            mutex=mutex,
        )
        self.config = config
        self.idle_keepalive_s = float(
            keepalive if keepalive is not None else celery_autoscale.AUTOSCALE_KEEPALIVE
        )
        self.scale_state = ScaleState()
        self._read_backlog = read_backlog
        self.sampler: BacklogSampler | None = None
        self.last_decision: Decision | None = None
        self._decide_now = threading.Event()  # set by each sample (the thread's tick)

    def _ensure_sampler(self) -> BacklogSampler:
        # Started on the first tick (after the pool's first fork), not in __init__.
        if self.sampler is None:
            read = self._read_backlog or backlog_reader(self.config.source)
            what = "broker" if self.config.source == "broker" else "database"
            self.sampler = BacklogSampler(
                read, self.config.sample_every_s, what, on_sample=self._decide_now.set
            )
            self.sampler.start()
        return self.sampler

    def policy(self) -> Policy:
        return Policy(
            min_processes=int(self.min_concurrency),
            max_processes=int(self.max_concurrency),
            threshold=self.config.threshold,
            grow_after_s=self.config.grow_after_s,
            keepalive_s=self.idle_keepalive_s,
            surge_factor=self.config.surge_factor,
        )

    def sample(self, now: float) -> Sample:
        sampler = self._ensure_sampler()
        procs = int(self.processes)
        reserved = len(worker_state.reserved_requests)
        active = len(worker_state.active_requests)
        waiting_here = max(0, reserved - procs)
        if waiting_here and procs < self.max_concurrency:
            # A burst shows here first; the next period's sample could be a second away
            # (docs/reference.md#autoscaler-settings).
            sampler.request(now, PROMPT_SAMPLE_S)
        sampled = sampler.latest(now)
        # Queued rows already include what this worker reserved; a broker queue does not.
        backlog = (
            sampled + waiting_here if self.config.source == "broker" else max(sampled, waiting_here)
        )
        return Sample(
            now=now,
            processes=procs,
            reserved=reserved,
            active=active,
            backlog=backlog,
            last_received=self._last_task_received,
        )

    def body(self) -> None:
        # The thread without an event loop (the embedded SQLite broker).  Celery's
        # decides once a second; this one every tick and right after each sample, so
        # a requested sample is acted on at once.
        self._decide_now.clear()
        with self.mutex:
            self.maybe_scale()
        self._decide_now.wait(self.config.tick_s)

    def maybe_scale(self, req: Any = None) -> None:
        if req is not None:
            self.on_task_received(req)
        # Celery then maintains the pool from this thread.  billiard's blocking pool
        # (the SQLite broker) already does that from its supervisor thread every
        # 0.1 s, and two maintainers race: a process created twice, "KeyError: None"
        # in _join_exited_workers, AssertionError in _avail_index.  Its supervisor
        # starts the new processes on its own.
        if self._maybe_scale(req) and not _maintains_itself(self.pool):
            self.pool.maintain_pool()

    def _maybe_scale(self, req: Any = None) -> bool:
        now = monotonic()
        sample = self.sample(now)
        previous = self.scale_state
        decision = decide(self.policy(), previous, sample)
        self.scale_state = decision.state
        self.last_decision = decision
        if decision.delta > 0:
            log.info(
                "autoscale: %d -> %d processes (%s)",
                sample.processes,
                sample.processes + decision.delta,
                decision.reason,
            )
            self.scale_up(decision.delta)
            return True
        if decision.delta < 0:
            if self._scan_arrived_since(sample):
                # Without the event loop the consumer runs in another thread: a scan
                # may have been handed over since the sample (celery#7266).
                self.scale_state = previous  # decide again, guard now in force
                return False
            log.info(
                "autoscale: %d -> %d processes (%s)",
                sample.processes,
                sample.processes + decision.delta,
                decision.reason,
            )
            self.scale_down(-decision.delta)
            return True
        return False

    def _scan_arrived_since(self, sample: Sample) -> bool:
        return self._last_task_received != sample.last_received or len(
            worker_state.reserved_requests
        ) > len(worker_state.active_requests)

    def scale_down(self, n: int) -> None:
        # decide() already waited out the keepalive; Celery's own check would re-time it.
        self._shrink(n)

    def _shrink(self, n: int) -> None:
        pool = getattr(self.pool, "_pool", None)  # billiard's pool behind Celery's TaskPool
        if pool is None or not hasattr(pool, "_worker_active"):
            self.pool.shrink(n)
            return
        ended = shrink_idle_processes(pool, n)
        if ended < n:
            log.info("autoscale: ended %d of %d processes; the others are busy", ended, n)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = super().info()
        info.update(
            source=self.config.source,
            threshold=self.config.threshold,
            grow_after_s=self.config.grow_after_s,
            surge_factor=self.config.surge_factor,
            keepalive_s=self.idle_keepalive_s,
            backlog=self.sampler.latest(monotonic()) if self.sampler else None,
        )
        return info

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        self._decide_now.set()
        if self.is_alive():  # a thread only without the event loop
            super().stop()


def _maintains_itself(pool: Any) -> bool:
    """Whether Celery's pool is billiard's blocking pool, with its own supervisor thread."""
    return bool(getattr(getattr(pool, "_pool", None), "threads", False))


def shrink_idle_processes(pool: Any, n: int) -> int:
    """End up to ``n`` idle processes of a billiard pool; return how many.

    billiard's own ``Pool.shrink`` picks from every process it still lists,
    including one it already told to end that has not exited yet (a process
    sleeps a second in its exit path).  Two shrinks within that second then
    count the same process twice and leave a live one the pool no longer counts:
    it is never ended, and never replaced either.  Only live processes that are
    not ending already and hold no job are counted here.

    How a process is ended depends on the pool:

    * Celery's event-loop pool (``AsynPool``, the Redis and AMQP brokers) gives
      each process its own queues, so a chosen process is told to end with
      SIGTERM;
    * the blocking pool (the embedded SQLite broker) has one shared job queue
      whose idle readers queue on one lock, and a process signalled while it
      waits for that lock stays blocked until the lock comes to it, which is
      when the next scan arrives.  There a "leave" job goes through the queue
      instead: whichever idle process reads it exits cleanly, no signal needed.
    """
    if getattr(pool, "threads", False):
        return _send_leave_jobs(pool, n)
    ended = 0
    for process in _idle_processes(pool, set()):
        if ended >= n:
            break
        _count_one_less(pool)
        process.terminate_controlled()
        ended += 1
    return ended


def leave_pool() -> None:
    """A pool job: the process that runs it reports it done and exits with 0."""
    raise SystemExit(0)


# Leave jobs sent to each blocking pool and not yet known to be over.
_leaving: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def _send_leave_jobs(pool: Any, n: int) -> int:
    live = {process.pid for process in pool._pool if process.exitcode is None}
    # A leave job stays on the books until the process that took it is gone.
    leaving = [job for job in _leaving.get(pool, []) if set(job.worker_pids()) <= live]
    waiting = sum(1 for job in leaving if not job.worker_pids())
    ending = {pid for job in leaving for pid in job.worker_pids()}
    idle = len(_idle_processes(pool, ending)) - waiting
    sent = max(0, min(n, idle))
    for _ in range(sent):
        _count_one_less(pool)
        leaving.append(pool.apply_async(leave_pool, waitforslot=False))
    _leaving[pool] = leaving
    return sent


def _idle_processes(pool: Any, ending: set[int]) -> list[Any]:
    return [
        process
        for process in list(pool._pool)
        if process.exitcode is None
        and not getattr(process, "_controlled_termination", False)
        and process.pid not in ending
        and not pool._worker_active(process)
    ]


def _count_one_less(pool: Any) -> None:
    pool._processes -= 1
    if pool._putlock:
        pool._putlock.shrink()
    pool.on_shrink(1)
