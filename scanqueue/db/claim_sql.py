"""The dispatch claim's SQL under the scan policies, and the look that avoids it.

One source for both dialects (docs/reference.md#policies).  Run inside the
serialized claim transaction, it reads the pauses, the limits, the slots each key
holds (running plus dispatched-not-started) and the window's in-flight count,
picks what to claim and, when higher priorities wait behind a full window, which
dispatched scans to release in exchange (the *swap*):

* PostgreSQL: one statement — CTEs down to ``UPDATE … RETURNING`` for the
  claimed and the released rows, with ``FOR UPDATE SKIP LOCKED`` on both, so a
  row another session holds locked is passed over rather than waited for.
* SQLite: the same CTEs as one ``SELECT`` of the ids, then one ``UPDATE`` for the
  claimed and one for the released (``BEGIN IMMEDIATE`` already holds the lock).

How it picks, in claim order (priority, then age, then id), each key taking at most
its room (limit minus the slots it holds; 0 when paused):

1. the first ``:m`` rows of ``scans_claim_order_idx``.  Without limits or pauses
   only the rows it takes are read; with them, this is enough unless the keys at
   the head of the order are full, paused or soon at their limit.  Otherwise:
2. with at most :data:`FEW_KEYS` queued keys (a loose scan of
   ``scans_key_claim_order_idx`` finds them), the first rows of each key with room;
3. with more keys, the claim order again, past the keys that step 1 found full
   (at most :data:`WALK_ROWS` rows);
4. when that is not enough either, the first rows of every queued key with room.

So a claim costs the same at 10**3 and 10**6 queued rows when every key is full,
and when every scan has a key of its own.  The one costly shape left: more than
WALK_ROWS rows of full keys ahead of everything else *and* many distinct keys,
where step 4 reads one index entry per queued key.

Parameters: ``:key_limit`` (the default per-key limit, 0 = none), ``:limit`` (the
batch), ``:window``, ``:cap`` (most rows one claim takes or swaps: min(batch,
window)) and ``:m`` (rows step 1 reads).  Result rows: ``('claimed', id,
created_at, priority)``, ``('released', id)`` and one ``('in_flight', n)``, the
count before the claim (PostgreSQL's also says whether a pause or limit applied,
``policed``, and whether unseen rows are left beyond those it claimed,
``unseen_left``).  PostgreSQL's claim takes in the unseen rows it claims: it keys
them in SQL as the intake would, and judges them by that key.

PostgreSQL also has a plain claim (:func:`plain_claim_sql`) for while no pause or
limit exists: the same result without the key-room machinery, and nothing claimed
(``policed`` true) should one exist after all.
"""

from __future__ import annotations

import re

from scanqueue.db.schema import SQLITE_NOW_SQL

# The per-connection name of the prepared PostgreSQL statement (see ClaimsMixin).
# v2: claimed rows carry the key they were seen with; v3: the in-flight row says
# whether any pause or limit applied (``policed``).
PG_STATEMENT_NAME = "scanqueue_claim_v3"
PG_PLAIN_STATEMENT_NAME = "scanqueue_claim_plain_v1"
PARAMS = ("key_limit", "limit", "window", "cap", "m")
# Steps 2 and 3 of the module docstring: the most keys read one by one before the
# claim order is walked instead, and the most rows that walk reads.
FEW_KEYS = 100
WALK_ROWS = 10_000
# Set for the claim's transaction only.  Planning the statement costs about 3.5 ms and
# running it well under one, so it is prepared and planned once, generically.  A
# generic plan is made with whatever statistics the table has then (none, on a new
# database), so every choice that could go wrong with a grown table is ruled out:
# no sequential or bitmap scans of the backlog, no sort where an index gives the
# order.  The plan's intended shape is index reads throughout (its tests check the
# rows it reads).  Its cost estimate passes jit_above_cost; compiling would cost
# far more than running it.
PG_PLANNER_SETTINGS = (
    ("plan_cache_mode", "force_generic_plan"),
    ("jit", "off"),
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_sort", "off"),
)


def _pg_string_array(column: str) -> str:
    """SQL: ``column`` (jsonb) parses as the Runner API parses it: no value, JSON
    null, or an array of strings only."""
    return (
        f"({column} IS NULL OR jsonb_typeof({column}) = 'null'"
        f" OR (jsonb_typeof({column}) = 'array' AND NOT EXISTS ("
        f"SELECT 1 FROM jsonb_array_elements({column}) x WHERE jsonb_typeof(x) <> 'string')))"
    )


def _pg_joined(column: str) -> str:
    """SQL: the sorted strings of ``column`` joined by ``,`` (code point order, as
    Python's ``sorted``: the "C" collation compares UTF-8 bytes)."""
    return (
        "(SELECT coalesce(string_agg(e, ',' ORDER BY e COLLATE \"C\"), '')"
        f" FROM jsonb_array_elements_text(CASE WHEN jsonb_typeof({column}) = 'array'"
        f" THEN {column} ELSE '[]'::jsonb END) e)"
    )


def pg_sql_keyable(scan_key: str, providers: str, frameworks: str) -> str:
    """SQL: the row's key can be derived in SQL exactly as
    ``scanqueue.db.keys.effective_key`` derives it from the Runner API's parsing (the
    rest: a malformed column, or a scan_key with whitespace or a non-ASCII character
    at either end, whose stripping is Python's)."""
    return (
        f"({scan_key} IS NULL OR {scan_key} = '' OR {scan_key} ~ '^[!-~](.*[!-~])?$')"
        f" AND {_pg_string_array(providers)} AND {_pg_string_array(frameworks)}"
    )


def pg_key(scan_key: str, providers: str, frameworks: str) -> str:
    """SQL: the effective key of a row :func:`pg_sql_keyable` accepts."""
    return (
        f"CASE WHEN {scan_key} IS NULL OR {scan_key} = ''"
        f" THEN {_pg_joined(providers)} || '|' || {_pg_joined(frameworks)} ELSE {scan_key} END"
    )


# An unseen row PostgreSQL's claim may take (it marks it seen, with its key, and
# returns it for its scan.queued): one SQL can key; others wait for the intake.  The
# claim order's first rows carry that key (_PG_RAW_KEY), so the pauses and limits judge
# them as they judge rows taken in; the deeper searches under policies (few keys, the
# walk, every key) read keyed rows only.
_PG_UNSEEN_OK = pg_sql_keyable("scan_key", "providers_scanned", "frameworks_scanned")
_PG_KEY_OF_S = pg_key("s.scan_key", "s.providers_scanned", "s.frameworks_scanned")
_PG_RAW_KEY = (
    "coalesce(effective_key, " + pg_key("scan_key", "providers_scanned", "frameworks_scanned") + ")"
)


def fast_rows(cap: int) -> int:
    """Rows step 1 reads: room for the keys at the head to fill up a few times over."""
    return 4 * cap + 64


# {now}, {greatest}, {least}, {by_*} (SQLite's INDEXED BY: without statistics it
# would sort the backlog) differ per dialect; the rest is common.
_COMMON = """
WITH RECURSIVE
pz AS MATERIALIZED (SELECT key FROM scanqueue_pauses),
lim AS MATERIALIZED (SELECT key, max_running FROM scanqueue_limits),
flight AS MATERIALIZED (
    SELECT id, effective_key, priority, dispatched_at FROM scans{by_flight}
    WHERE status = 'queued' AND dispatched_at IS NOT NULL),
act AS MATERIALIZED (
    SELECT k AS key, count(*) AS n FROM (
        SELECT effective_key AS k FROM scans{by_running} WHERE status = 'running'
        UNION ALL SELECT effective_key FROM flight) a
    WHERE k IS NOT NULL GROUP BY k),
keyroom AS MATERIALIZED (
    SELECT k.key,
        CASE WHEN EXISTS (SELECT 1 FROM pz WHERE pz.key = k.key) THEN 0
             WHEN coalesce(l.max_running, :key_limit) > 0
             THEN {greatest}(coalesce(l.max_running, :key_limit) - coalesce(a.n, 0), 0)
        END AS room
    FROM (SELECT key FROM pz UNION SELECT key FROM lim UNION SELECT key FROM act) k
    LEFT JOIN lim l ON l.key = k.key LEFT JOIN act a ON a.key = k.key),
state AS MATERIALIZED (
    SELECT s.*, (SELECT count(*) FROM flight f WHERE f.priority < s.top) AS lower
    FROM (SELECT
        EXISTS (SELECT 1 FROM pz WHERE key = '*') AS all_paused,
        (:key_limit > 0 OR EXISTS (SELECT 1 FROM pz) OR EXISTS (SELECT 1 FROM lim)) AS policed,
        (SELECT count(*) FROM flight) AS in_flight,
        (SELECT priority FROM scans{by_claim}
         WHERE status = 'queued' AND dispatched_at IS NULL
           AND (run_after IS NULL OR run_after <= {now})
         ORDER BY priority DESC, created_at, id LIMIT 1) AS top) s),
sizes AS MATERIALIZED (
    SELECT policed, take,
        CASE WHEN all_paused THEN 0 ELSE {least}(:cap, take + lower) END AS cap
    FROM (SELECT policed, lower, all_paused,
            CASE WHEN all_paused THEN 0
                 ELSE {greatest}(0, {least}(:limit, :window - in_flight)) END AS take
          FROM state) t),
raw AS MATERIALIZED (
    SELECT id, {raw_key} AS effective_key, priority, created_at FROM scans{by_claim}
    WHERE status = 'queued' AND dispatched_at IS NULL
      AND (run_after IS NULL OR run_after <= {now})
      AND (effective_key IS NOT NULL OR {unseen_ok})
    ORDER BY priority DESC, created_at, id
    LIMIT :m),
ranked_raw AS MATERIALIZED (
    SELECT r.*, row_number() OVER (
            PARTITION BY r.effective_key ORDER BY r.priority DESC, r.created_at, r.id) AS nth,
        {room_of_kr} AS room
    FROM raw r LEFT JOIN keyroom kr ON kr.key = r.effective_key),
fast AS MATERIALIZED (
    SELECT id, effective_key, priority, created_at FROM ranked_raw
    WHERE room IS NULL OR nth <= room),
verdict AS MATERIALIZED (
    SELECT (SELECT count(*) FROM fast) >= (SELECT cap FROM sizes)
        OR (SELECT count(*) FROM raw) < :m AS complete),
gate AS MATERIALIZED (
    SELECT (SELECT policed FROM sizes) AND NOT (SELECT complete FROM verdict) AS open),
few_keys(k, depth) AS (
    SELECT ({first_key}), 1 WHERE (SELECT open FROM gate)
    UNION ALL
    SELECT ({next_few}), depth + 1 FROM few_keys WHERE few_keys.k IS NOT NULL
      AND depth <= {few}),
few AS MATERIALIZED (
    SELECT NOT EXISTS (SELECT 1 FROM few_keys WHERE depth > {few} AND k IS NOT NULL) AS yes),
saturated AS MATERIALIZED (
    SELECT key FROM keyroom WHERE room = 0
    UNION SELECT effective_key FROM ranked_raw WHERE room IS NOT NULL AND nth > room),
walk_raw AS MATERIALIZED (
    SELECT id, effective_key, priority, created_at FROM scans{by_claim}
    WHERE status = 'queued' AND dispatched_at IS NULL
      AND (run_after IS NULL OR run_after <= {now}) AND effective_key IS NOT NULL
    ORDER BY priority DESC, created_at, id
    LIMIT CASE WHEN (SELECT open FROM gate) AND NOT (SELECT yes FROM few) THEN {walk} ELSE 0 END),
walk AS MATERIALIZED (
    SELECT w.id, w.effective_key, w.priority, w.created_at FROM walk_raw w
    WHERE NOT EXISTS (SELECT 1 FROM saturated s WHERE s.key = w.effective_key)
    LIMIT (SELECT 2 * cap + 16 FROM sizes)),
walked AS MATERIALIZED (
    SELECT id, priority, created_at FROM (
        SELECT w.*, row_number() OVER (
                PARTITION BY w.effective_key ORDER BY w.priority DESC, w.created_at, w.id) AS nth,
            {room_of_kr} AS room
        FROM walk w LEFT JOIN keyroom kr ON kr.key = w.effective_key) w
    WHERE room IS NULL OR nth <= room
    UNION ALL
    SELECT id, priority, created_at FROM fast WHERE effective_key IN (SELECT key FROM saturated)),
walked_ok AS MATERIALIZED (
    SELECT (SELECT count(*) FROM walked) >= (SELECT cap FROM sizes)
        OR ((SELECT count(*) FROM walk) < (SELECT 2 * cap + 16 FROM sizes)
            AND (SELECT count(*) FROM walk_raw) < {walk})
        AS complete),
route AS MATERIALIZED (
    SELECT CASE WHEN NOT (SELECT open FROM gate) THEN 'first'
                WHEN (SELECT yes FROM few) THEN 'few'
                WHEN (SELECT complete FROM walked_ok) THEN 'walk'
                ELSE 'all' END AS way),
all_keys(k) AS (
    SELECT ({first_key}) WHERE (SELECT way FROM route) = 'all'
    UNION ALL
    SELECT ({next_all}) FROM all_keys WHERE all_keys.k IS NOT NULL),
roomy AS (
    SELECT kk.k, {room_of_kr} AS room
    FROM (SELECT k FROM few_keys WHERE k IS NOT NULL AND (SELECT way FROM route) = 'few'
          UNION ALL SELECT k FROM all_keys WHERE k IS NOT NULL) kk
    LEFT JOIN keyroom kr ON kr.key = kk.k),
"""

# The first rows of each key with room; PostgreSQL reads them with LATERAL.
_SLOW_PG = """
slow AS (
    SELECT c.id, c.priority, c.created_at
    FROM roomy CROSS JOIN LATERAL (
        SELECT t.id, t.priority, t.created_at FROM (
            SELECT s.id, s.priority, s.created_at FROM scans s
            WHERE s.effective_key = roomy.k AND s.status = 'queued'
              AND s.dispatched_at IS NULL
              AND (s.run_after IS NULL OR s.run_after <= clock_timestamp())
            ORDER BY s.priority DESC, s.created_at, s.id
            LIMIT :cap) t
        LIMIT coalesce(roomy.room, :cap)) c
    WHERE roomy.room IS NULL OR roomy.room > 0),
"""
# SQLite has no LATERAL and no correlated LIMIT: the first :cap of each key, ranked.
_SLOW_SQLITE = """
slow AS (
    SELECT id, priority, created_at FROM (
        SELECT s.id, s.priority, s.created_at, roomy.room, row_number() OVER (
                PARTITION BY roomy.k ORDER BY s.priority DESC, s.created_at, s.id) AS nth
        FROM roomy JOIN scans s ON s.id IN (
            SELECT id FROM scans{by_key}
            WHERE effective_key = roomy.k AND status = 'queued' AND dispatched_at IS NULL
              AND (run_after IS NULL OR run_after <= {now})
            ORDER BY priority DESC, created_at, id LIMIT :cap)
        WHERE roomy.room IS NULL OR roomy.room > 0) t
    WHERE t.room IS NULL OR t.nth <= t.room),
"""

# Without limits or pauses only the first :cap rows are read (raw is read lazily).
_PICKED = """
picked AS MATERIALIZED (
    SELECT u.id, u.priority, u.created_at FROM (
        SELECT * FROM (
            SELECT id, priority, created_at FROM raw WHERE NOT (SELECT policed FROM sizes)
            LIMIT (SELECT cap FROM sizes)) plain
        UNION ALL
        SELECT id, priority, created_at FROM fast
        WHERE (SELECT policed FROM sizes) AND (SELECT way FROM route) = 'first'
        UNION ALL
        SELECT id, priority, created_at FROM walked WHERE (SELECT way FROM route) = 'walk'
        UNION ALL SELECT id, priority, created_at FROM slow) u
    ORDER BY u.priority DESC, u.created_at, u.id LIMIT (SELECT cap FROM sizes)),
"""

# The first `take` picked fill the window's room; each further one is swapped for
# the lowest-priority dispatched scan left (newest dispatch first among equals)
# while it outranks it strictly.  Picked descend and victims ascend, so the pairs
# that qualify are a prefix.
_PAIRS = """
pairs AS MATERIALIZED (
    SELECT r.id AS claim_id, v.id AS release_id
    FROM ranked r JOIN (
        SELECT id, priority,
            row_number() OVER (ORDER BY priority, dispatched_at DESC, id DESC) AS nth
        FROM lowest) v ON v.nth = r.nth - (SELECT take FROM sizes)
    WHERE r.priority > v.priority)
"""

_TAIL_PG = (
    """
mine AS MATERIALIZED (
    SELECT s.id, s.priority, s.created_at, s.status, s.dispatched_at,
        CASE WHEN s.seen_at IS NULL THEN coalesce(s.effective_key, """
    + _PG_KEY_OF_S
    + """) END AS new_key
    FROM scans s
    WHERE s.id = ANY (ARRAY(SELECT id FROM picked))
    FOR UPDATE OF s SKIP LOCKED),
ranked AS MATERIALIZED (
    SELECT id, priority, row_number() OVER (ORDER BY priority DESC, created_at, id) AS nth
    FROM mine WHERE status = 'queued' AND dispatched_at IS NULL),
lowest AS MATERIALIZED (
    SELECT s.id, s.priority, s.dispatched_at FROM scans s
    WHERE s.status = 'queued' AND s.dispatched_at IS NOT NULL
      AND s.priority < (SELECT top FROM state)
    ORDER BY s.priority, s.dispatched_at DESC, s.id DESC
    LIMIT (SELECT cap - take FROM sizes)
    FOR UPDATE OF s SKIP LOCKED),
"""
    + _PAIRS
    + """,
claimed AS (
    UPDATE scans s SET dispatched_at = clock_timestamp(), dispatch_count = s.dispatch_count + 1,
        seen_at = coalesce(s.seen_at, clock_timestamp()),
        effective_key = coalesce(s.effective_key, m.new_key)
    FROM mine m
    WHERE s.id = m.id AND s.id = ANY (ARRAY(
        SELECT id FROM ranked WHERE nth <= (SELECT take FROM sizes)
        UNION ALL SELECT claim_id FROM pairs))
    RETURNING s.id, s.created_at, s.priority, m.new_key),
released AS (
    UPDATE scans s SET dispatched_at = NULL
    WHERE s.id = ANY (ARRAY(SELECT release_id FROM pairs))
    RETURNING s.id)
SELECT 'claimed' AS what, id, created_at, priority, NULL::bigint AS n, new_key AS key,
    NULL::boolean AS policed, NULL::boolean AS unseen_left FROM claimed
UNION ALL SELECT 'released', id, NULL, NULL, NULL, NULL, NULL, NULL FROM released
UNION ALL SELECT 'in_flight', NULL, NULL, NULL, in_flight, NULL, policed,
    EXISTS (SELECT 1 FROM scans u WHERE u.status = 'queued' AND u.seen_at IS NULL
            AND u.id NOT IN (SELECT id FROM claimed))
    FROM state
"""
)

# The claim while no pause or limit exists (PostgreSQL): the window's count, the swap's
# two ends and the head of the claim order, with none of the key-room machinery
# above.  It judges under the same lock: should a pause or limit exist after all,
# it claims nothing and says ``policed``, and the caller runs the whole statement.
_PLAIN_HEAD_PG = (
    """
WITH
state AS MATERIALIZED (
    SELECT s.*, (SELECT count(*) FROM scans f
                 WHERE f.status = 'queued' AND f.dispatched_at IS NOT NULL
                   AND f.priority < s.top) AS lower
    FROM (SELECT
        (:key_limit > 0 OR EXISTS (SELECT 1 FROM scanqueue_pauses)
            OR EXISTS (SELECT 1 FROM scanqueue_limits)) AS policed,
        (SELECT count(*) FROM scans
         WHERE status = 'queued' AND dispatched_at IS NOT NULL) AS in_flight,
        (SELECT priority FROM scans
         WHERE status = 'queued' AND dispatched_at IS NULL
           AND (run_after IS NULL OR run_after <= clock_timestamp())
         ORDER BY priority DESC, created_at, id LIMIT 1) AS top) s),
sizes AS MATERIALIZED (
    SELECT take, CASE WHEN policed THEN 0 ELSE least(:cap, take + lower) END AS cap
    FROM (SELECT policed, lower,
            CASE WHEN policed THEN 0
                 ELSE greatest(0, least(:limit, :window - in_flight)) END AS take
          FROM state) t),
picked AS MATERIALIZED (
    SELECT id, priority, created_at FROM scans
    WHERE status = 'queued' AND dispatched_at IS NULL
      AND (run_after IS NULL OR run_after <= clock_timestamp())
      AND (effective_key IS NOT NULL OR ("""
    + _PG_UNSEEN_OK
    + """))
    ORDER BY priority DESC, created_at, id
    LIMIT (SELECT cap FROM sizes)),
"""
)

_TAIL_SQLITE = (
    """
ranked AS MATERIALIZED (
    SELECT id, priority, row_number() OVER (ORDER BY priority DESC, created_at, id) AS nth
    FROM picked),
lowest AS MATERIALIZED (
    SELECT id, priority, dispatched_at FROM flight
    WHERE priority < (SELECT top FROM state)
    ORDER BY priority, dispatched_at DESC, id DESC
    LIMIT (SELECT cap - take FROM sizes)),
"""
    + _PAIRS
    + """
SELECT 'claimed' AS what, id, NULL AS n FROM ranked WHERE nth <= (SELECT take FROM sizes)
UNION ALL SELECT 'claimed', claim_id, NULL FROM pairs
UNION ALL SELECT 'released', release_id, NULL FROM pairs
UNION ALL SELECT 'in_flight', NULL, in_flight FROM state
"""
)

_DIALECT = {
    "postgresql": {
        "now": "clock_timestamp()",
        "greatest": "greatest",
        "least": "least",
        "by_flight": "",
        "by_running": "",
        "by_claim": "",
        "by_key": "",
        "unseen_ok": f"({_PG_UNSEEN_OK})",
        "raw_key": _PG_RAW_KEY,
    },
    "sqlite": {
        "now": SQLITE_NOW_SQL,
        "greatest": "max",
        "least": "min",
        "by_flight": " INDEXED BY scans_queued_dispatched_idx",
        "by_running": " INDEXED BY scans_running_heartbeat_idx",
        "by_claim": " INDEXED BY scans_claim_order_idx",
        "by_key": " INDEXED BY scans_key_claim_order_idx",
        # The claim's caller takes in the unseen rows it picks (Python keys them), so
        # only while no pause or limit needs their key.
        "unseen_ok": "NOT (SELECT policed FROM state)",
        "raw_key": "effective_key",
    },
}


# The loose scan of the queued keys: the first, and the next after ``{src}.k``.
_FIRST_KEY = (
    "SELECT effective_key FROM scans{by_key}"
    " WHERE status = 'queued' AND dispatched_at IS NULL AND effective_key IS NOT NULL"
    " ORDER BY effective_key, priority DESC, created_at, id LIMIT 1"
)
_NEXT_KEY = (
    "SELECT effective_key FROM scans{by_key}"
    " WHERE status = 'queued' AND dispatched_at IS NULL AND effective_key > {src}.k"
    " ORDER BY effective_key, priority DESC, created_at, id LIMIT 1"
)
# A key's room from its keyroom row ``kr`` (LEFT JOINed): none there, the default.
_ROOM_OF_KR = (
    "CASE WHEN kr.key IS NULL THEN CASE WHEN :key_limit > 0 THEN :key_limit END ELSE kr.room END"
)


def policy_claim_sql(dialect: str, *, key_index: bool = True) -> str:
    """The claim with ``:name`` parameters: PostgreSQL's whole statement, or SQLite's
    SELECT of the ids to claim and release.  ``key_index=False``: SQLite without
    ``scans_key_claim_order_idx`` (a schema older than the code: slower, not wrong)."""
    fmt = dict(_DIALECT[dialect])
    if not key_index:
        fmt["by_key"] = ""
    fmt.update(
        first_key=_FIRST_KEY.format(**fmt),
        next_few=_NEXT_KEY.format(src="few_keys", **fmt),
        next_all=_NEXT_KEY.format(src="all_keys", **fmt),
        room_of_kr=_ROOM_OF_KR,
        few=str(FEW_KEYS),
        walk=str(WALK_ROWS),
    )
    common = _COMMON.format(**fmt)
    if dialect == "postgresql":
        return common + _SLOW_PG + _PICKED + _TAIL_PG
    return common + _SLOW_SQLITE.format(**fmt) + _PICKED + _TAIL_SQLITE


def plain_claim_sql() -> str:
    """PostgreSQL's claim for while no pause or limit exists (``_PLAIN_HEAD_PG``):
    the same parameters and result rows as :func:`policy_claim_sql`, and when a
    pause or limit does exist, no row claimed and ``policed`` true."""
    return _PLAIN_HEAD_PG + _TAIL_PG


def _statement(plain: bool) -> tuple[str, str]:
    """(prepared name, SQL) of the whole or the plain PostgreSQL claim."""
    if plain:
        return PG_PLAIN_STATEMENT_NAME, plain_claim_sql()
    return PG_STATEMENT_NAME, policy_claim_sql("postgresql")


def pg_prepare_sql(*, plain: bool = False) -> str:
    """``PREPARE`` for the PostgreSQL claim, its parameters numbered in :data:`PARAMS` order."""
    name, sql = _statement(plain)
    for i, param in enumerate(PARAMS, start=1):
        sql = re.sub(rf"(?<!:):{param}\b", f"${i}::int", sql)
    return f"PREPARE {name} ({', '.join('int' for _ in PARAMS)}) AS {sql}"


def pg_settings_sql() -> str:
    """``set_config`` calls (transaction-local) for :data:`PG_PLANNER_SETTINGS`."""
    calls = (f"set_config('{name}', '{value}', true)" for name, value in PG_PLANNER_SETTINGS)
    return ", ".join(calls)


def pg_execute_sql(*, plain: bool = False) -> str:
    """``EXECUTE`` of the prepared claim, with the driver's named placeholders."""
    name = _statement(plain)[0]
    return f"EXECUTE {name} ({', '.join(f'%({param})s' for param in PARAMS)})"


def pg_one_trip_sql(lock_key: int, *, prepared: bool, plain: bool = False) -> str:
    """The PostgreSQL claim as one round trip: the lock (with the planner settings)
    and the claim, sent as one query string, which the server runs as one implicit
    transaction: the lock is held until the claim's update commits.

    That commit does not wait for its WAL flush (``synchronous_commit`` off, for this
    transaction only): the claim's publish follows it at once.  A claim lost in a
    server crash loses nothing: the run's start, a durable compare-and-set, takes
    only a dispatched scan, and flushing it flushes the claim before it; a scan
    whose claim was lost is queued and undispatched again and claimed anew, and of
    its two messages the start lets one run it.  (A row the lost claim took in may
    send a second ``scan.queued``.)  ``prepared``:
    ``EXECUTE`` of :func:`pg_prepare_sql`; else the statement itself (planned on
    every call), with the driver's ``%(name)s`` placeholders.  ``plain``: the
    claim for while no pause or limit exists (:func:`plain_claim_sql`)."""
    lock = (
        f"SELECT pg_advisory_xact_lock({int(lock_key)}), {pg_settings_sql()},"
        f" set_config('synchronous_commit', 'off', true)"
    )
    if prepared:
        return f"{lock}; {pg_execute_sql(plain=plain)}"
    sql = _statement(plain)[1].replace("%", "%%")
    for param in PARAMS:
        sql = re.sub(rf"(?<!:):{param}\b", f"%({param})s::int", sql)
    return f"{lock}; {sql}"


def look_sql(dialect: str, unseen: bool) -> str:
    """Without the lock: in flight, their lowest priority, the highest claimable one,
    the whole queue paused, and (``unseen``) whether intake has rows to take in."""
    d = _DIALECT[dialect]
    seen = ""
    if unseen:
        by_unseen = " INDEXED BY scans_unseen_idx" if dialect == "sqlite" else ""
        seen = (
            f", EXISTS (SELECT 1 FROM scans{by_unseen}"
            " WHERE status = 'queued' AND seen_at IS NULL) AS unseen"
        )
    return (
        "SELECT count(*) AS in_flight, min(priority) AS lowest,"
        f" (SELECT priority FROM scans{d['by_claim']}"
        " WHERE status = 'queued' AND dispatched_at IS NULL"
        f" AND (run_after IS NULL OR run_after <= {d['now']})"
        " ORDER BY priority DESC, created_at, id LIMIT 1) AS top,"
        " EXISTS (SELECT 1 FROM scanqueue_pauses WHERE key = '*') AS all_paused"
        f"{seen} FROM scans{d['by_flight']}"
        " WHERE status = 'queued' AND dispatched_at IS NOT NULL"
    )
