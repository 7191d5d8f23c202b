"""The SARIF reader streams every large member (issue 14 item 6), not only ``results``.

The big test writes a report whose ``artifacts`` array is 256 MiB (plus a
long string in ``invocations`` and thousands of rules) and reads it in a
separate process, as a pool process would, measuring that process's peak
resident memory.  Size and bound come from the environment
(``SCANQUEUE_TEST_SARIF_ARTIFACTS_MIB``, default 256) so CI can shrink it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scanqueue.runners.providers import sarif
from scanqueue.runners.providers.sarif import SarifError, iter_findings

ARTIFACTS_MIB = int(os.environ.get("SCANQUEUE_TEST_SARIF_ARTIFACTS_MIB", "256"))
# Peak RSS of the reading process, at most (the interpreter and imports take ~20 MiB;
# reading the whole report into memory would take well over 320 MiB).
MAX_RSS_MIB = 64


def _doc(run: dict[str, object]) -> str:
    return json.dumps({"version": "2.1.0", "runs": [run]})


def _result(rule: str, message: str = "m") -> dict[str, object]:
    return {"ruleId": rule, "message": {"text": message}}


def test_skipped_members_with_awkward_strings_read_in_tiny_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sarif, "READ_CHUNK_CHARS", 3)
    monkeypatch.setattr(sarif, "SKIP_DECODE_LIMIT", 8)  # step through nearly everything
    run = {
        "artifacts": [{"location": {"uri": 'a"b\\\\c\\"' * 5}, "n": [1, 2.5, True, None]}] * 4,
        "invocations": [{"commandLine": "x\\" + '"' * 3 + "\\u00e9" * 10}],
        "results": [_result("R1"), _result("R2", "second")],
        "tool": {
            "driver": {
                "name": "t",
                "rules": [{"id": "R1", "name": "one"}, {"id": "R2", "name": "two"}],
            },
            "extensions": [{"name": "big", "rules": [{"id": "X"}] * 3}],
        },
        "threadFlowLocations": {"k": [[], {}, ""]},
    }
    found = list(iter_findings(io.StringIO(_doc(run))))
    assert [(f.check_id, f.title, f.message) for f in found] == [
        ("R1", "one", "m"),
        ("R2", "two", "second"),
    ]


def test_rules_are_found_by_index_and_by_id_after_the_results() -> None:
    rules = [{"id": f"R{i}", "name": f"rule {i}"} for i in range(3000)]
    run = {
        "results": [
            {"ruleIndex": 2999, "message": {"text": "by index"}},
            _result("R1500/sub"),  # a hierarchical id falls back to its parent
        ],
        "tool": {"driver": {"name": "t", "rules": rules}},
    }
    found = list(iter_findings(io.StringIO(_doc(run))))
    assert [(f.check_id, f.title) for f in found] == [
        ("R2999", "rule 2999"),
        ("R1500/sub", "rule 1500"),
    ]


@pytest.mark.parametrize(
    ("tail", "says"),
    [
        ('"artifacts": [{"a": 1}, {"a": ]}', "invalid JSON"),
        ('"artifacts": "never ends', "unterminated string"),
        ('"tool": {"driver": {"rules": {}}}}', "rules must be an array"),
        ('"tool": 3}', "driver must be an object"),
    ],
)
def test_broken_members_are_still_rejected_while_skipped(
    tail: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sarif, "SKIP_DECODE_LIMIT", 4)
    text = '{"version": "2.1.0", "runs": [{' + tail + "]}"
    with pytest.raises(SarifError, match=says):
        list(iter_findings(io.StringIO(text)))


def test_temporary_disk_is_capped() -> None:
    run = {"results": [_result("R", "x" * 1000)] * 100, "tool": {"driver": {"name": "t"}}}
    with pytest.raises(SarifError, match="temporary disk"):
        list(iter_findings(io.StringIO(_doc(run)), max_spool_bytes=50_000))
    assert len(list(iter_findings(io.StringIO(_doc(run)), max_spool_bytes=1_000_000))) == 100


def _write_big_report(path: Path, artifacts_mib: int) -> int:
    """A report with an ``artifacts`` array of ``artifacts_mib`` MiB; returns its size."""
    artifact = json.dumps(
        {
            "location": {"uri": "file:///src/" + "d/" * 20 + "f.py"},
            "length": 1234,
            "contents": {"text": 'print("hi")\\n' * 60},
            "hashes": {"sha-256": "ab" * 32},
        }
    )
    per_mib = (1 << 20) // (len(artifact) + 1)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write('{"version": "2.1.0", "$schema": "x", "runs": [{"artifacts": [')
        chunk = ",".join([artifact] * per_mib)
        for i in range(artifacts_mib):
            fh.write(("," if i else "") + chunk)
        fh.write('], "invocations": [{"executionSuccessful": true, "stdout": "')
        fh.write("0123456789abcdef" * (4 << 20))  # a 64 MiB string
        fh.write('"}], "results": [')
        fh.write(",".join(json.dumps(_result(f"R{i % 50}", f"finding {i}")) for i in range(2000)))
        fh.write('], "tool": {"driver": {"name": "big", "rules": [')
        fh.write(",".join(json.dumps({"id": f"R{i}", "name": f"rule {i}"}) for i in range(50)))
        fh.write("]}}}]}")
    return path.stat().st_size


# Peak RSS from VmHWM: getrusage's ru_maxrss survives exec on Linux, so it would
# report the parent (pytest) process's peak instead of the reader's.
READER = """
import sys, time
from scanqueue.runners.providers.sarif import iter_findings
t0 = time.monotonic()
with open(sys.argv[1], encoding="utf-8") as fh:
    n = sum(1 for _ in iter_findings(fh))
took = time.monotonic() - t0
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(n, round(hwm / 1024, 1), round(took, 2))
"""


@pytest.mark.slow
def test_a_report_with_a_256_mib_artifacts_array_keeps_memory_bounded(tmp_path: Path) -> None:
    report = tmp_path / "big.sarif"
    size = _write_big_report(report, ARTIFACTS_MIB)
    try:
        out = subprocess.run(
            [sys.executable, "-c", READER, str(report)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout.split()
    finally:
        report.unlink()
    count, rss_mib, took = int(out[0]), float(out[1]), float(out[2])
    print(
        f"\nSARIF {size / (1 << 20):.0f} MiB report ({ARTIFACTS_MIB} MiB artifacts, 64 MiB string):"
        f" {count} findings, peak RSS {rss_mib:.0f} MiB, {took:.1f}s"
    )
    assert count == 2000
    assert rss_mib < MAX_RSS_MIB
