"""Render bench/results/latest.json (and micro.json) as the tables of bench/README.md.

.venv/bin/python -m bench.report [path/to/latest.json]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def g(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return "–"
        d = d[k]
    return d


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(res: dict[str, Any], micro: dict[str, Any] | None) -> str:
    m = res["meta"]
    mc = m["machine"]
    out = [
        f"Run: {m['mode']}, started {m['started_utc']}, {m['duration_s']:.0f} s; "
        f"load average at start {m['load_start']}, at end {m['load_end']}.",
        f"Machine: {mc['nproc']} CPUs ({mc['cpu']}), {mc['memory_gib']} GiB, Linux "
        f"{mc['kernel']}; Python {mc['python']}, Celery {mc['celery']}, kombu {mc['kombu']}, "
        f"SQLAlchemy {mc['sqlalchemy']}, PostgreSQL {mc['postgresql']}, Redis "
        f"{mc.get('redis', '–')}, SQLite {mc['sqlite']}.",
        "",
    ]
    for backend, label in (
        ("postgresql", "PostgreSQL + Redis"),
        ("sqlite", "SQLite (database and embedded broker)"),
    ):
        d = res.get(backend)
        if not d:
            continue
        out.append(f"#### {label}\n")
        pk = d.get("pickup", {})
        rows = []
        for who, name in (
            ("scanqueue", "scanqueue"),
            ("raw_celery", "raw Celery (publish→start)"),
            ("old_pool", "old pool model"),
        ):
            rows.append(
                [
                    name,
                    g(pk, who, "p50_ms"),
                    g(pk, who, "p99_ms"),
                    g(pk, who, "n"),
                    g(pk, who, "created_to_claimed", "p50_ms"),
                    g(pk, who, "claimed_to_started", "p50_ms"),
                ]
            )
        out.append("Pickup latency at idle (ms; scanqueue and old pool: database clock)\n")
        out.append(
            table(["system", "p50", "p99", "n", "p50 created→claimed", "p50 claimed→started"], rows)
        )
        r = pk.get("ratios", {})
        out.append(
            f"\nscanqueue/raw Celery: p50 {g(r, 'p50_vs_raw_celery')}, p99 "
            f"{g(r, 'p99_vs_raw_celery')}; scanqueue/old pool: p50 {g(r, 'p50_vs_old_pool')}, "
            f"p99 {g(r, 'p99_vs_old_pool')}.\n"
        )
        fl = d.get("floor", {})
        if "insert_to_listen" in fl:
            out.append(
                table(
                    ["floor piece", "p50 ms", "p99 ms"],
                    [
                        [
                            "INSERT with trigger → NOTIFY readable on a LISTEN connection",
                            fl["insert_to_listen"]["p50_ms"],
                            fl["insert_to_listen"]["p99_ms"],
                        ],
                        [
                            "one claim-and-commit as plain SQL (one autocommit statement)",
                            g(fl, "raw_claim_and_commit", "p50_ms"),
                            g(fl, "raw_claim_and_commit", "p99_ms"),
                        ],
                        [
                            "one claim-and-commit (`Store.claim_for_dispatch`, 1 row)",
                            fl["claim_and_commit"]["p50_ms"],
                            fl["claim_and_commit"]["p99_ms"],
                        ],
                        [
                            "raw Celery publish→start (above)",
                            g(pk, "raw_celery", "p50_ms"),
                            g(pk, "raw_celery", "p99_ms"),
                        ],
                    ],
                )
            )
            out.append("")
        tp = d.get("throughput", {})
        rows = []
        for who, name in (
            ("scanqueue_c2", "scanqueue, --autoscale=2,2"),
            ("scanqueue_c2_standalone_bridge", "scanqueue, 2,2, standalone bridge (CPU incl.)"),
            ("scanqueue_c2_events_flower", "scanqueue, 2,2, task events on, Flower attached"),
            ("raw_celery_c2_E_flower", "raw Celery, 2,2, -E, Flower attached"),
            ("procrastinate_c2", "Procrastinate, concurrency 2"),
            ("raw_celery_c2", "raw Celery, --autoscale=2,2"),
            ("raw_celery_c2_two_writes", "raw Celery, 2,2, task makes the two CAS writes"),
            ("old_pool", "old pool model, 2 workers"),
            ("scanqueue_c6", "scanqueue, --autoscale=6,6"),
            ("raw_celery_c6", "raw Celery, --autoscale=6,6"),
        ):
            rows.append(
                [
                    name,
                    g(tp, who, "n"),
                    g(tp, who, "per_s"),
                    g(tp, who, "cpu_ms_per_scan"),
                    g(tp, who, "memory", "main_vmhwm_mib"),
                    g(tp, who, "memory", "pool_vmhwm_mib_max"),
                    g(tp, who, "exactly_once", "ok"),
                ]
            )
        out.append("Throughput, no-op runner, task events off\n")
        out.append(
            table(
                [
                    "system",
                    "scans",
                    "completed/s",
                    "worker CPU ms/scan",
                    "main VmHWM MiB",
                    "pool VmHWM MiB",
                    "exactly once",
                ],
                rows,
            )
        )
        cpus = os.cpu_count() or 1
        split_rows = []
        for who, name in (
            ("scanqueue_c2", "scanqueue, 2,2"),
            ("raw_celery_c2", "raw Celery, 2,2"),
            ("raw_celery_c2_two_writes", "raw Celery, 2,2, two CAS writes"),
            ("scanqueue_c2_standalone_bridge", "scanqueue, 2,2, standalone bridge"),
            ("procrastinate_c2", "Procrastinate, concurrency 2"),
            ("scanqueue_c6", "scanqueue, 6,6"),
            ("raw_celery_c6", "raw Celery, 6,6"),
        ):
            split = g(tp, who, "cpu_split_ms_per_scan")
            if not isinstance(split, dict):
                continue
            per_s = g(tp, who, "per_s")
            busy = (
                round(100.0 * split["machine"] * per_s / (1000.0 * cpus))
                if isinstance(per_s, (int, float))
                else None
            )
            split_rows.append(
                [
                    name,
                    split["worker"],
                    split["postgres"],
                    split["redis"],
                    split["other"],
                    split["machine"],
                    busy,
                ]
            )
        if split_rows:
            out.append(f"\nWhere the machine's CPU went, ms per scan ({cpus} CPUs)\n")
            out.append(
                table(
                    [
                        "system",
                        "worker (incl. publisher/bridge)",
                        "PostgreSQL",
                        "Redis",
                        "other",
                        "machine",
                        "CPUs busy %",
                    ],
                    split_rows,
                )
            )
        r = tp.get("ratios", {})
        out.append(
            f"\nscanqueue/raw Celery: c2 {g(r, 'c2_vs_raw_celery')} (against raw Celery "
            f"whose task makes the two CAS writes: {g(r, 'c2_vs_raw_celery_two_writes')}), c6 "
            f"{g(r, 'c6_vs_raw_celery')}; scanqueue/old pool: c2 {g(r, 'c2_vs_old_pool')}, "
            f"c6 {g(r, 'c6_vs_old_pool')}; standalone bridge/raw Celery: c2 "
            f"{g(r, 'c2_standalone_bridge_vs_raw_celery')}; task events + Flower vs raw "
            f"Celery -E + Flower: c2 {g(r, 'c2_events_flower_vs_raw_celery_E')}; scanqueue/"
            f"Procrastinate: c2 {g(r, 'c2_vs_procrastinate')} (Procrastinate/raw Celery "
            f"{g(r, 'procrastinate_c2_vs_raw_celery')}).\n"
        )
        st = d.get("stub50", {})
        out.append(
            f"50 ms stub, `--autoscale=6,2`, {g(st, 'scanqueue', 'n')} scans: scanqueue "
            f"{g(st, 'scanqueue', 'per_s')}/s, raw Celery (50 ms sleep task) "
            f"{g(st, 'raw_celery', 'per_s')}/s, ratio **{g(st, 'ratio_vs_raw_celery')}**. "
            f"With `SCANQUEUE_AUTOSCALE_GROW_AFTER=0` (grow at the first busy sample): "
            f"{g(st, 'scanqueue_grow_at_once', 'per_s')}/s, ratio "
            f"{g(st, 'grow_at_once_ratio_vs_raw_celery')}. Seconds from the backlog to each "
            f"process's first scan: scanqueue {g(st, 'scanqueue', 'process_first_start_s')}, "
            f"grow at once {g(st, 'scanqueue_grow_at_once', 'process_first_start_s')}, raw "
            f"Celery {g(st, 'raw_celery', 'process_first_start_s')}.\n"
        )
        gr = d.get("growth", {})
        rows = []
        for k, v in gr.items():
            if k == "ratios" or not isinstance(v, dict):
                continue
            rows.append(
                [
                    f"{int(k):,}",
                    g(v, "pickup", "p50_ms"),
                    g(v, "pickup", "p99_ms"),
                    g(v, "claim_one", "p50_ms"),
                    g(v, "claim_one", "p99_ms"),
                    g(v, "claim_empty", "p50_ms"),
                    g(v, "fill_s"),
                ]
            )
        if rows:
            out.append("Growth: finished rows in `scans`\n")
            out.append(
                table(
                    [
                        "finished rows",
                        "pickup p50 ms",
                        "pickup p99 ms",
                        "claim (1 row) p50 ms",
                        "claim p99 ms",
                        "claim (empty) p50 ms",
                        "fill s",
                    ],
                    rows,
                )
            )
            out.append(f"\nRatios largest/smallest: {gr.get('ratios')}.\n")
        mem = d.get("memory", {})
        if mem and "error" not in mem:
            out.append(
                f"Memory (peak RSS, VmHWM, after {mem['scans']} scans): standalone `scanqueue "
                f"bridge` {mem['bridge_vmhwm_mib']} MiB; worker `--without-bridge` main "
                f"{g(mem, 'worker', 'main_vmhwm_mib')} MiB, pool process "
                f"{g(mem, 'worker', 'pool_vmhwm_mib_max')} MiB.\n"
            )
    out.append("#### Targets\n")
    rows = []
    for t in res.get("targets", []):
        mark = {True: "**met**", False: "**not met**", None: "n/a"}[t["met"]]
        rows.append([t["target"], t["value"], f"{t['cmp']} {t['limit']}", mark, t["note"]])
    out.append(table(["target", "measured", "limit", "", "note"], rows))
    if micro:
        out.append("\n#### Hot-path steps (`python -m bench.micro`, PostgreSQL + Redis)\n")
        rows = [
            [k, v["wall_ms"], v["cpu_ms"], v["reps"]]
            for k, v in micro.items()
            if isinstance(v, dict) and "wall_ms" in v
        ]
        out.append(table(["step", "wall ms", "CPU ms", "reps"], rows))
        out.append(f"\nload {micro.get('load_start')} → {micro.get('load_end')}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0]) if args else RESULTS_DIR / "latest.json"
    res = json.loads(path.read_text())
    micro_path = RESULTS_DIR / "micro.json"
    micro = json.loads(micro_path.read_text()) if micro_path.exists() else None
    print(render(res, micro))
    return 0


if __name__ == "__main__":
    sys.exit(main())
