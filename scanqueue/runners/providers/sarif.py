"""SARIF 2.1.0 → findings, read as a stream so that a huge report never sits in memory.

The document is walked with a small pull parser: the top levels (the log
object, ``runs``, each run, its ``results``) are stepped through token by
token, and only one result (or one ``tool`` object) is decoded at a time.
Every large member is streamed, not only ``results``: ``tool.driver.rules`` is
read one rule at a time into a spool (with an index by position and id), and
members scanqueue does not use (``artifacts``, ``invocations``, ``graphs``,
``threadFlowLocations``, ``extensions`` …) are skipped without being decoded as
a whole — small values with one C-speed decode, large containers element by
element, long strings chunk by chunk.  Memory therefore stays bounded by the
largest single result or rule, whatever the report's size.

Because a run's ``tool.rules`` may come after its ``results`` (ruff writes them
in that order), each run's raw results are spooled to a temporary file and
mapped once the run is complete.  Every finding is written to a second spool,
and nothing is yielded until the whole document has proved valid: invalid
SARIF raises :class:`SarifError` before the first finding, so a broken report
never leaves partial findings behind.

Temporary disk: the spools (raw results, rules, mapped findings) live in the
system's temporary directory (``TMPDIR``) and are deleted as soon as the
report is read; together they may hold at most ``max_spool_bytes``
(:data:`DEFAULT_MAX_SPOOL_BYTES`, 1 GiB) per report, past which the report is
rejected with a :class:`SarifError` that says so.

Mapping: ``ruleId`` → check id; ``level`` (or the rule's default level)
error/warning/note/none → high/medium/low/info; ``locations[0]``'s artifact
URI → resource (relative to the scanner's working directory when it lies
inside it) and ``uri:startLine[:startColumn]`` → location; ``message.text`` →
message; the rule's ``name`` (or ``properties.name``, or its short description)
→ title; ``properties.frameworks`` of the rule and the result, and their tags
of the form ``framework:NAME``, → frameworks; ``partialFingerprints`` /
``fingerprints`` → the scanner-given fingerprint
(:func:`scanqueue.runners.fingerprint.sarif_fingerprint`).
"""

from __future__ import annotations

import json
import re
import tempfile
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from scanqueue.runners.fingerprint import sarif_fingerprint
from scanqueue.runners.providers.base import Finding

SARIF_VERSION = "2.1.0"
READ_CHUNK_CHARS = 1 << 16
LEVEL_TO_SEVERITY = {"error": "high", "warning": "medium", "note": "low", "none": "info"}
DEFAULT_LEVEL = "warning"  # SARIF §3.27.10: a result without a level is a warning
FRAMEWORK_TAG_PREFIX = "framework:"
STOP_CHECK_EVERY = 500  # results between two looks at the stop flag
# A skipped value up to this many characters is decoded in one go (C speed); a larger
# container is stepped through element by element, so it never sits in memory.
SKIP_DECODE_LIMIT = 1 << 20
DEFAULT_MAX_SPOOL_BYTES = 1 << 30  # temporary disk per report, all spools together
RULE_CACHE = 1024  # decoded rules kept for lookups while mapping results
_STRING_STOP = re.compile(r'["\\]')

_NON_WS = re.compile(r"[^ \t\n\r]")
_DECODER = json.JSONDecoder()


class SarifError(ValueError):
    """The document is not SARIF 2.1.0 that scanqueue can read."""


class _PullParser:
    """Just enough of a streaming JSON reader to step through SARIF's outer structure."""

    def __init__(self, fh: IO[str]) -> None:
        self._fh = fh
        self._buf = ""
        self._pos = 0
        self._dropped = 0  # characters already discarded from the front of the buffer
        self._eof = False

    @property
    def offset(self) -> int:
        return self._dropped + self._pos

    def _fill(self) -> bool:
        if self._eof:
            return False
        if self._pos > READ_CHUNK_CHARS:
            self._dropped += self._pos
            self._buf = self._buf[self._pos :]
            self._pos = 0
        # Grow geometrically so a large value is re-decoded O(log n) times, not O(n).
        data = self._fh.read(max(READ_CHUNK_CHARS, len(self._buf) - self._pos))
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end), without consuming it."""
        while True:
            m = _NON_WS.search(self._buf, self._pos)
            if m is not None:
                self._pos = m.start()
                return self._buf[self._pos]
            self._pos = len(self._buf)
            if not self._fill():
                return ""

    def expect(self, char: str) -> None:
        found = self.peek()
        if found != char:
            raise SarifError(
                f"expected {char!r} at offset {self.offset}, found {found or 'end of input'!r}"
            )
        self._pos += 1

    def value(self) -> Any:
        """Decode the next complete JSON value."""
        if not self.peek():
            raise SarifError(f"unexpected end of input at offset {self.offset}")
        while True:
            try:
                val, end = _DECODER.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                at = self._dropped + exc.pos
                if not self._fill():
                    raise SarifError(f"invalid JSON at offset {at}: {exc.msg}") from None
                continue
            # A number at the very end of the buffer may continue in the next chunk.
            if end < len(self._buf) or not self._fill():
                self._pos = end
                return val

    def skip(self) -> None:
        """Consume the next JSON value without keeping it (checked, never held whole)."""
        first = self.peek()
        if not first:
            raise SarifError(f"unexpected end of input at offset {self.offset}")
        if first == '"':
            self._skip_string()
        elif first in "[{":
            if self._decode_within(SKIP_DECODE_LIMIT):
                return
            if first == "[":
                for _ in self.items():
                    self.skip()
            else:
                for _ in self.members():
                    self.skip()
        else:
            self.value()  # a number, true, false or null

    def _decode_within(self, limit: int) -> bool:
        """Decode and drop the next value if it ends within ``limit`` characters."""
        while True:
            try:
                _, end = _DECODER.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if len(self._buf) - self._pos >= limit:
                    return False  # large (or broken): step through it instead
                if not self._fill():
                    raise SarifError(
                        f"invalid JSON at offset {self._dropped + exc.pos}: {exc.msg}"
                    ) from None
                continue
            self._pos = end
            return True

    def _skip_string(self) -> None:
        i = self._pos + 1  # past the opening quote
        while True:
            m = _STRING_STOP.search(self._buf, i)
            if m is None:
                self._pos = len(self._buf)  # all of it is string: let _fill drop it
                if not self._fill():
                    raise SarifError(f"unterminated string at offset {self.offset}")
                i = self._pos
                continue
            if m.group() == '"':
                self._pos = m.end()
                return
            if m.end() < len(self._buf):
                i = m.end() + 1  # an escape: skip the escaped character
                continue
            self._pos = m.start()  # a backslash at the end: keep it, read on
            if not self._fill():
                raise SarifError(f"unterminated string at offset {self.offset}")
            i = self._pos

    def members(self) -> Iterator[str]:
        """Step through an object: yields each key; the caller must consume its value."""
        self.expect("{")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            if self.peek() != '"':
                raise SarifError(f"expected an object key at offset {self.offset}")
            key = self.value()
            self.expect(":")
            yield key
            sep = self.peek()
            self._pos += 1
            if sep == "}":
                return
            if sep != ",":
                raise SarifError(f"expected ',' or '}}' at offset {self.offset - 1}")

    def items(self) -> Iterator[int]:
        """Step through an array: yields each index; the caller must consume the element."""
        self.expect("[")
        if self.peek() == "]":
            self._pos += 1
            return
        index = 0
        while True:
            yield index
            index += 1
            sep = self.peek()
            self._pos += 1
            if sep == "]":
                return
            if sep != ",":
                raise SarifError(f"expected ',' or ']' at offset {self.offset - 1}")

    def end(self) -> None:
        if self.peek():
            raise SarifError(f"unexpected data after the SARIF document at offset {self.offset}")


class _Spool:
    """Temporary files of one report, with a cap on the bytes written to them all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.written = 0

    def charge(self, size: int) -> None:
        self.written += size
        if self.written > self.max_bytes:
            raise SarifError(
                f"the report needs more than {self.max_bytes} bytes of temporary disk to read;"
                " it is too large"
            )


class _Rules:
    """A run's ``tool.driver.rules``, spooled to disk, found by index or by id.

    Only the index (an offset per rule, and the first position of each id) stays
    in memory, with a small cache of decoded rules.
    """

    def __init__(self, spool: _Spool) -> None:
        self._spool = spool
        self._file: IO[bytes] | None = None
        self._offsets = array("q")
        self.by_id: dict[str, int] = {}
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def add(self, rule: Any) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile("w+b")  # noqa: SIM115 - closed in close()
        rule = rule if isinstance(rule, dict) else {}
        data = json.dumps(rule, separators=(",", ":")).encode() + b"\n"
        self._spool.charge(len(data))
        self._file.seek(0, 2)
        self._offsets.append(self._file.tell())
        self._file.write(data)
        rid = rule.get("id")
        if isinstance(rid, str):
            self.by_id.setdefault(rid, len(self._offsets) - 1)

    def _get(self, index: int) -> dict[str, Any]:
        found = self._cache.get(index)
        if found is not None:
            self._cache.move_to_end(index)
            return found
        assert self._file is not None
        self._file.seek(self._offsets[index])
        rule: dict[str, Any] = json.loads(self._file.readline())
        self._cache[index] = rule
        if len(self._cache) > RULE_CACHE:
            self._cache.popitem(last=False)
        return rule

    def find(self, index: Any, rule_id: str | None) -> dict[str, Any]:
        if isinstance(index, int) and 0 <= index < len(self._offsets):
            return self._get(index)
        if rule_id is not None:
            # Hierarchical ids ("X/sub") fall back to their parent rule (SARIF §3.27.5).
            at = self.by_id.get(rule_id)
            if at is None:
                at = self.by_id.get(rule_id.split("/", 1)[0])
            return {} if at is None else self._get(at)
        return {}


def _read_tool(parser: _PullParser, rules: _Rules) -> None:
    """Step through ``tool``: spool ``driver.rules`` one by one, skip everything else."""
    if parser.peek() == "n":
        parser.value()  # null: a run without rule metadata
        return
    if parser.peek() != "{":
        raise SarifError("run.tool.driver must be an object")
    saw_driver = False
    for key in parser.members():
        if key != "driver":
            parser.skip()  # extensions and the like: not used
            continue
        if parser.peek() != "{":
            raise SarifError("run.tool.driver must be an object")
        saw_driver = True
        for dkey in parser.members():
            if dkey != "rules":
                parser.skip()
                continue
            first = parser.peek()
            if first == "n":
                parser.value()  # null: no rules
                continue
            if first != "[":
                raise SarifError("run.tool.driver.rules must be an array")
            for _ in parser.items():
                rules.add(parser.value())
    if not saw_driver:
        raise SarifError("run.tool.driver must be an object")


def iter_findings(
    fh: IO[str],
    base_dir: str | Path | None = None,
    stop: Callable[[], bool] | None = None,
    max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES,
) -> Iterator[Finding]:
    """Findings of a SARIF 2.1.0 document; SarifError (before the first one) if invalid.

    ``stop`` is polled while the document is read; once it returns True nothing
    more is read and nothing is yielded.  ``max_spool_bytes`` caps the temporary
    disk the read may use (see the module's docstring).
    """
    base = Path(base_dir).resolve() if base_dir is not None else None
    spool = _Spool(max_spool_bytes)
    with tempfile.TemporaryFile("w+", encoding="utf-8") as mapped:
        try:
            _map_document(_PullParser(fh), mapped, base, stop or _never, spool)
        except _Stopped:
            return
        mapped.seek(0)
        for line in mapped:
            check_id, message, severity, resource, location, title, status, frameworks, fp = (
                json.loads(line)
            )
            yield Finding(
                check_id,
                message,
                severity,
                resource,
                location,
                title,
                status,
                tuple(frameworks),
                fp,
            )


class _Stopped(Exception):
    pass


def _never() -> bool:
    return False


def _check_stop(stop: Callable[[], bool], index: int) -> None:
    if index % STOP_CHECK_EVERY == 0 and stop():
        raise _Stopped


def _map_document(
    parser: _PullParser,
    out: IO[str],
    base: Path | None,
    stop: Callable[[], bool],
    spool: _Spool,
) -> None:
    if parser.peek() != "{":
        raise SarifError("the document is not a JSON object")
    version: Any = None
    saw_runs = False
    with tempfile.TemporaryFile("w+", encoding="utf-8") as raw:
        for key in parser.members():
            if key == "version":
                version = parser.value()
                if version != SARIF_VERSION:
                    raise SarifError(f"version is {version!r}, expected {SARIF_VERSION!r}")
            elif key == "runs":
                if parser.peek() != "[":
                    raise SarifError("runs must be an array")
                saw_runs = True
                for run_index in parser.items():
                    _map_run(parser, run_index, raw, out, base, stop, spool)
            else:
                parser.skip()
        parser.end()
    if version is None:
        raise SarifError(f"no version (expected {SARIF_VERSION!r})")
    if not saw_runs:
        raise SarifError("no runs")


def _map_run(
    parser: _PullParser,
    run_index: int,
    raw: IO[str],
    out: IO[str],
    base: Path | None,
    stop: Callable[[], bool],
    spool: _Spool,
) -> None:
    if parser.peek() != "{":
        raise SarifError(f"runs[{run_index}] is not an object")
    raw.seek(0)
    raw.truncate()
    rules = _Rules(spool)
    try:
        _map_run_members(parser, run_index, raw, out, base, stop, spool, rules)
    finally:
        rules.close()


def _map_run_members(
    parser: _PullParser,
    run_index: int,
    raw: IO[str],
    out: IO[str],
    base: Path | None,
    stop: Callable[[], bool],
    spool: _Spool,
    rules: _Rules,
) -> None:
    count = 0
    for key in parser.members():
        if key == "tool":
            _read_tool(parser, rules)
        elif key == "results":
            if parser.peek() == "n":  # null: results were not computed
                parser.value()
                continue
            if parser.peek() != "[":
                raise SarifError(f"runs[{run_index}].results must be an array")
            for i in parser.items():
                _check_stop(stop, i)
                result = parser.value()
                if not isinstance(result, dict):
                    raise SarifError(f"runs[{run_index}].results[{i}] is not an object")
                line = json.dumps(result, separators=(",", ":"))
                spool.charge(len(line) + 1)
                raw.write(line)
                raw.write("\n")
                count += 1
        else:
            parser.skip()  # artifacts, invocations, graphs …: streamed past, never held
    # SARIF requires a tool, but a run without one only lacks rule metadata.
    raw.seek(0)
    for i, line in enumerate(raw):
        if i >= count:
            break
        _check_stop(stop, i)
        finding = _map_result(json.loads(line), rules, base, f"runs[{run_index}].results[{i}]")
        row = [
            finding.check_id,
            finding.message,
            finding.severity,
            finding.resource,
            finding.location,
            finding.title,
            finding.status,
            finding.frameworks,
            finding.fingerprint,
        ]
        line = json.dumps(row, separators=(",", ":"))
        spool.charge(len(line) + 1)
        out.write(line)
        out.write("\n")


def _map_result(result: dict[str, Any], rules: _Rules, base: Path | None, where: str) -> Finding:
    raw_ref = result.get("rule")
    ref: dict[str, Any] = raw_ref if isinstance(raw_ref, dict) else {}
    index = result.get("ruleIndex", ref.get("index"))
    rule_id = _str(result.get("ruleId")) or _str(ref.get("id"))
    rule = rules.find(index, rule_id)
    check_id = rule_id or _str(rule.get("id"))
    if not check_id:
        raise SarifError(f"{where} has no ruleId")

    level = result.get("level")
    if level is None:
        default = rule.get("defaultConfiguration")
        level = default.get("level") if isinstance(default, dict) else None
    level = DEFAULT_LEVEL if level is None else level
    if level not in LEVEL_TO_SEVERITY:
        raise SarifError(f"{where}.level is {level!r}, not one of {', '.join(LEVEL_TO_SEVERITY)}")

    message = _message(result.get("message"), rule)
    if message is None and "message" in result:
        raise SarifError(f"{where}.message has no text")
    if message is None:  # required by SARIF, but the rule may still say what is wrong
        message = _text(rule.get("shortDescription")) or _text(rule.get("fullDescription"))

    resource, location = _location(result, base)
    status = _str(result.get("kind")) or "fail"
    suppressions = result.get("suppressions")
    if isinstance(suppressions, list) and any(
        isinstance(s, dict) and s.get("status", "accepted") == "accepted" for s in suppressions
    ):
        status = "suppressed"

    return Finding(
        check_id=check_id,
        message=message,
        severity=LEVEL_TO_SEVERITY[level],
        resource=resource,
        location=location,
        title=_title(rule),
        status=status,
        frameworks=_frameworks(rule, result),
        fingerprint=sarif_fingerprint(result),
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _text(obj: Any) -> str | None:
    if isinstance(obj, dict):
        return _str(obj.get("text")) or _str(obj.get("markdown"))
    return None


def _message(message: Any, rule: dict[str, Any]) -> str | None:
    if not isinstance(message, dict):
        return None
    text = _text(message)
    if text is None and isinstance(message.get("id"), str):
        strings = rule.get("messageStrings")
        if isinstance(strings, dict):
            text = _text(strings.get(message["id"]))
    if text is None:
        return None
    arguments = message.get("arguments")
    if isinstance(arguments, list):
        for i, arg in enumerate(arguments):
            text = text.replace(f"{{{i}}}", str(arg))
    return text


def _title(rule: dict[str, Any]) -> str | None:
    props = rule.get("properties")
    return (
        _str(rule.get("name"))
        or (_str(props.get("name")) if isinstance(props, dict) else None)
        or _text(rule.get("shortDescription"))
    )


def _frameworks(rule: dict[str, Any], result: dict[str, Any]) -> tuple[str, ...]:
    found: list[str] = []
    for owner in (rule, result):
        props = owner.get("properties")
        if not isinstance(props, dict):
            continue
        declared = props.get("frameworks")
        if isinstance(declared, str):
            declared = [declared]
        if isinstance(declared, list):
            found.extend(f for f in declared if isinstance(f, str) and f)
        tags = props.get("tags")
        if isinstance(tags, list):
            found.extend(
                t[len(FRAMEWORK_TAG_PREFIX) :]
                for t in tags
                if isinstance(t, str)
                and t.startswith(FRAMEWORK_TAG_PREFIX)
                and len(t) > len(FRAMEWORK_TAG_PREFIX)
            )
    return tuple(dict.fromkeys(found))


def _location(result: dict[str, Any], base: Path | None) -> tuple[str | None, str | None]:
    locations = result.get("locations")
    first = locations[0] if isinstance(locations, list) and locations else None
    if not isinstance(first, dict):
        return None, None
    physical = first.get("physicalLocation")
    if isinstance(physical, dict):
        artifact = physical.get("artifactLocation")
        uri = _str(artifact.get("uri")) if isinstance(artifact, dict) else None
        if uri is not None:
            resource = _resource(uri, base)
            region = physical.get("region")
            line = region.get("startLine") if isinstance(region, dict) else None
            if not isinstance(line, int):
                return resource, resource
            column = region.get("startColumn") if isinstance(region, dict) else None
            suffix = f":{line}:{column}" if isinstance(column, int) else f":{line}"
            return resource, resource + suffix
    logical = first.get("logicalLocations")
    if isinstance(logical, list) and logical and isinstance(logical[0], dict):
        name = _str(logical[0].get("fullyQualifiedName")) or _str(logical[0].get("name"))
        return name, name
    return None, None


def _resource(uri: str, base: Path | None) -> str:
    parts = urlsplit(uri)
    if parts.scheme != "file":
        return uri
    path = Path(unquote(parts.path))
    if base is not None:
        try:
            return PurePosixPath(path.relative_to(base)).as_posix()
        except ValueError:
            pass
    return path.as_posix()
