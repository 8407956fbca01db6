"""The runs and nights of a runs directory, as the page lists them.

A *run* is any directory holding a ``run.json`` at most :data:`MAX_DEPTH`
levels under the runs directory (``runs/<id>``, ``runs/nightly/<id>``,
``runs/nightly/replays/<id>``, a run's own ``replay-1/``); a node's, user's
or registry's folder is never entered.  A run is known by its *key*, its
path under the runs directory: the only way a request names a run, so no
request can name a path outside it.

Listing reads three small files per run (``run.json``, ``chaos.json``,
``verdict.json``) and keeps what it read while their modification times stay
the same: listing 500 runs again is 1,500 ``stat`` calls.

A *nightly folder* is one holding a ``nightly.json`` (``swarmnet chaos
nightly`` writes it, and replaces it each night).  Its runs are grouped into
nights by start time (a gap of :data:`NIGHT_GAP_MS` starts a new night), so
the nights before the last are still seen from their run directories.
Nothing here writes.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import msgspec

from testnet import rundir
from testnet.procs import proc_state

MAX_DEPTH = 4
NOT_RUNS = frozenset({"nodes", "users", "registry"})  # folders of a run that hold no run
NIGHT_GAP_MS = 3 * 3600 * 1000
NIGHTLY_FILE = "nightly.json"
_FILES = ("run.json", "chaos.json", "verdict.json")
SIM_BLOCK = "127.250."  # a simulated run's addresses (RUNDIR.md): it is one before its verdict says so


class UnknownRun(LookupError):
    """No run of the runs directory has this key."""


@dataclass
class RunRow:
    """One run as the runs list shows it (every field may be missing from a half-made run)."""

    key: str
    run_id: str
    kind: str = "testnet"  # testnet | chaos | sim
    scenario: str | None = None
    seed: int | None = None
    inject_bugs: list[str] = field(default_factory=list)
    valid: Any = None  # True | False | "unknown" | None (no verdict)
    checkers: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    nodes: int = 0
    users: int = 0
    links_mode: str | None = None
    started_ms: int | None = None
    duration_ms: int | None = None
    state: str | None = None
    controller: dict[str, Any] | None = None  # pid and create_time, to tell a live run
    report: bool = False
    error: str | None = None  # why the run could not be read whole
    made_ms: int | None = None  # when the directory was made, from its name (a simulated run's clock is virtual)

    @property
    def when_ms(self) -> int | None:
        """When the run happened on this machine: its directory's time, else its record's start."""
        return self.made_ms if self.made_ms is not None else self.started_ms

    @property
    def live(self) -> bool:
        ctl = self.controller or {}
        return (self.state in ("starting", "ready") and bool(ctl.get("pid"))
                and proc_state(ctl["pid"], ctl.get("create_time")) != "dead")

    def to_json(self, live: bool | None = None) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "controller"}
        out["live"] = self.live if live is None else live
        out["when_ms"] = self.when_ms
        out["seed"] = js_int(self.seed)
        if out["live"] and self.started_ms is not None and self.duration_ms is None:
            out["duration_ms"] = max(0, int(time.time() * 1000) - self.started_ms)  # running for
        out["group"] = self.key.split("/")[0] if "/" in self.key else ""
        return out


def js_int(v: Any) -> Any:
    """An integer as a browser reads it exactly: past 2^53 (a run seed is 63 bits), as text."""
    return str(v) if isinstance(v, int) and abs(v) > 2**53 - 1 else v


class _Skip(msgspec.Struct):
    """Any JSON object, none of its fields kept (a node record when only nodes are counted)."""


class _RunHead(msgspec.Struct):
    run_id: Any = None
    seed: Any = None
    state: Any = None
    started_ms: Any = None
    links_mode: Any = None
    block: Any = None
    nodes: list[_Skip] = []
    users: list[_Skip] = []
    controller: Any = None


class _CheckerHead(msgspec.Struct):
    valid: Any = None


class _VerdictHead(msgspec.Struct):
    valid: Any = None
    checked_ms: Any = None
    checkers: dict[str, _CheckerHead] = {}
    faults: Any = None
    sim: Any = None


# Typed decoders read only the fields a row shows: 4-5 times faster than json.loads on a
# verdict's capped message lists, which is most of listing 500 runs the first time.
_DECODERS = {"run.json": msgspec.json.Decoder(_RunHead), "verdict.json": msgspec.json.Decoder(_VerdictHead)}


def _read_json(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path.name}: {exc.strerror}") from None
    decoder = _DECODERS.get(path.name)
    if decoder is not None:
        try:
            return msgspec.to_builtins(decoder.decode(data))
        except msgspec.ValidationError:
            pass  # not the shape a row expects: read it as any JSON, and say what is wrong below
        except msgspec.DecodeError as exc:
            raise ValueError(f"{path.name}: {exc}") from None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


_STAMP = re.compile(r"^(\d{8}-\d{6})")


def made_ms(name: str) -> int | None:
    """When a run directory named ``YYYYmmdd-HHMMSS-...`` (``rundir.new_run_id``) was made, local time."""
    m = _STAMP.match(name)
    if not m:
        return None
    try:
        return int(time.mktime(time.strptime(m.group(1), "%Y%m%d-%H%M%S")) * 1000)
    except ValueError:
        return None


def read_row(key: str, path: Path) -> RunRow:
    """A run's row from its run.json, chaos.json and verdict.json; never raises (``error`` says why)."""
    row = RunRow(key, path.name, made_ms=made_ms(path.name))
    try:
        run = _read_json(path / "run.json")
        if not isinstance(run, dict):
            raise ValueError("run.json is not a run record")
        chaos = _read_json(path / "chaos.json")
        verdict = _read_json(path / "verdict.json")
    except ValueError as exc:
        row.error = str(exc)
        return row
    row.run_id = str(run.get("run_id") or path.name)
    row.seed = _int(run.get("seed"))
    row.state = run.get("state") if isinstance(run.get("state"), str) else None
    row.started_ms = _int(run.get("started_ms"))
    row.links_mode = run.get("links_mode") if isinstance(run.get("links_mode"), str) else None
    row.nodes = len(run.get("nodes") or [])
    row.users = len(run.get("users") or [])
    row.controller = run.get("controller") if isinstance(run.get("controller"), dict) else None
    row.report = (path / "report.html").is_file()
    simulated = str(run.get("block") or "").startswith(SIM_BLOCK)
    if isinstance(chaos, dict):
        row.kind = "sim" if simulated else "chaos"
        row.scenario = chaos.get("scenario") if isinstance(chaos.get("scenario"), str) else None
        row.seed = _int(chaos.get("seed")) if _int(chaos.get("seed")) is not None else row.seed
        row.inject_bugs = [str(b) for b in chaos.get("inject_bugs") or []]
    if isinstance(verdict, dict):
        row.valid = verdict.get("valid")
        checkers = verdict.get("checkers") if isinstance(verdict.get("checkers"), dict) else {}
        row.checkers = {name: (v.get("valid") if isinstance(v, dict) else None) for name, v in checkers.items()}
        faults = verdict.get("faults") if isinstance(verdict.get("faults"), dict) else {}
        row.faults = {k: (len(v) if isinstance(v, list) else v) for k, v in faults.items()
                      if isinstance(v, (int, list)) and not isinstance(v, bool)}
        sim = verdict.get("sim") if isinstance(verdict.get("sim"), dict) else None
        if sim is not None:
            row.kind = "sim"
            run_part = sim.get("run") if isinstance(sim.get("run"), dict) else sim
            secs = run_part.get("virtual_s")
            row.duration_ms = int(secs * 1000) if isinstance(secs, (int, float)) else None
        elif row.started_ms is not None and _int(verdict.get("checked_ms")) is not None:
            row.duration_ms = max(0, verdict["checked_ms"] - row.started_ms)
    if row.duration_ms is None and row.started_ms is not None and row.state in ("stopped", "failed"):
        try:
            row.duration_ms = max(0, int((path / "run.json").stat().st_mtime * 1000) - row.started_ms)
        except OSError:
            pass
    return row


def _walk(root: Path, depth: int = 0) -> Iterator[Path]:
    """Every run directory under ``root`` (symlinks such as ``latest`` are not followed)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        if not e.is_dir(follow_symlinks=False) or e.name in NOT_RUNS or e.name.startswith("."):
            continue
        p = Path(e.path)
        if (p / "run.json").is_file():
            yield p
        if depth + 1 < MAX_DEPTH:
            yield from _walk(p, depth + 1)


class RunIndex:
    """The runs of one runs directory, re-read only where a file changed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self._rows: dict[str, tuple[tuple[int, ...], RunRow]] = {}
        self._paths: dict[str, Path] = {}

    def _stamp(self, path: Path) -> tuple[int, ...]:
        out = []
        for name in _FILES:
            try:
                st = os.stat(path / name)
                out += [st.st_mtime_ns, st.st_size]
            except OSError:
                out += [0, -1]
        out.append(int((path / "report.html").exists()))
        return tuple(out)

    def scan(self) -> list[RunRow]:
        """Every run, newest first."""
        rows, paths = {}, {}
        for path in _walk(self.root):
            key = path.relative_to(self.root).as_posix()
            stamp = self._stamp(path)
            cached = self._rows.get(key)
            row = cached[1] if cached and cached[0] == stamp else read_row(key, path)
            rows[key] = (stamp, row)
            paths[key] = path
        self._rows, self._paths = rows, paths
        return sorted((r for _, r in rows.values()), key=lambda r: (r.when_ms or 0, r.key), reverse=True)

    def path_of(self, key: str) -> Path:
        """The directory of run ``key``; :class:`UnknownRun` unless a scan found it."""
        if key not in self._paths:
            self.scan()
        try:
            return self._paths[key]
        except KeyError:
            raise UnknownRun(f"no run {key!r} in {self.root}") from None

    def row(self, key: str) -> RunRow:
        self.path_of(key)
        return self._rows[key][1]

    def key_of(self, path: Path) -> str | None:
        """The key of a run directory under the runs directory, else None."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None

    def latest_live(self) -> str | None:
        """The run a page watches by default: ``latest`` if live, else the newest live run."""
        latest = self.root / rundir.LATEST
        if latest.is_symlink():
            key = self.key_of(latest)
            if key is not None:
                try:
                    if self.row(key).live:
                        return key
                except UnknownRun:
                    pass
        for row in self.scan():
            if row.live:
                return row.key
        return None


# --------------------------------------------------------------------------- nights


def _expected(bug: str) -> str | None:
    from testnet.base.bugs import BUGS

    entry = BUGS.get(bug)
    return entry[2] if entry else None


def _entry(row: RunRow) -> dict[str, Any]:
    failing = sorted(n for n, v in row.checkers.items() if v is False)
    bug = row.inject_bugs[0] if row.inject_bugs else None
    out = {"name": f"canary: {bug}" if bug else (row.scenario or row.run_id), "scenario": row.scenario,
           "canary": bug, "seed": js_int(row.seed), "valid": row.valid, "failing": failing, "run": row.key,
           "when_ms": row.when_ms}
    if bug:
        out["expect_failing"] = _expected(bug)
        out["passed"] = out["expect_failing"] in failing
    else:
        out["passed"] = row.valid is True
    return out


def nightly_folders(root: Path) -> list[Path]:
    """Folders holding a nightly.json: the runs directory itself and its children."""
    found = [root] if (root / NIGHTLY_FILE).is_file() else []
    try:
        found += sorted(Path(e.path) for e in os.scandir(root)
                        if e.is_dir(follow_symlinks=False) and (Path(e.path) / NIGHTLY_FILE).is_file())
    except OSError:
        pass
    return found


def nights(index: RunIndex, rows: list[RunRow]) -> list[dict[str, Any]]:
    """Per nightly folder: its nights, newest first, each run a pass or fail with its seed; the
    names (scenarios, canaries) seen in any night; the last nightly.json's own summary."""
    out = []
    for folder in nightly_folders(index.root):
        prefix = "" if folder == index.root else folder.relative_to(index.root).as_posix() + "/"
        mine = [r for r in rows if r.key.startswith(prefix) and "/" not in r.key[len(prefix):]
                and r.when_ms is not None and r.kind in ("chaos", "sim")]
        mine.sort(key=lambda r: (r.when_ms or 0, r.started_ms or 0, r.key))
        groups: list[list[RunRow]] = []
        for r in mine:
            if not groups or (r.when_ms or 0) - (groups[-1][-1].when_ms or 0) > NIGHT_GAP_MS:
                groups.append([])
            groups[-1].append(r)
        night_list = []
        for g in groups:
            first = g[0].when_ms or 0
            entries = [_entry(r) for r in g]
            night_list.append({"label": time.strftime("%Y-%m-%d %H:%M", time.localtime(first / 1000)),
                               "started_ms": first, "entries": entries,
                               "passed": sum(e["passed"] for e in entries),
                               "failed": sum(not e["passed"] for e in entries)})
        try:
            summary = _read_json(folder / NIGHTLY_FILE)
            summary_error = None
        except ValueError as exc:
            summary, summary_error = None, str(exc)
        if isinstance(summary, list) and night_list:
            # Entries of the last night that left no run (an error before the run began).
            for s in summary:
                if isinstance(s, dict) and not s.get("run_dir"):
                    bug = s.get("inject_bug")
                    night_list[-1]["entries"].append({
                        "name": f"canary: {bug}" if bug else str(s.get("scenario")), "scenario": s.get("scenario"),
                        "canary": bug, "seed": s.get("seed"), "valid": s.get("valid"), "failing": [],
                        "run": None, "passed": bool(s.get("passed")), "error": s.get("error")})
                    night_list[-1]["failed"] += not s.get("passed")
        names = sorted({e["name"] for n in night_list for e in n["entries"]},
                       key=lambda n: (n.startswith("canary: "), n))
        out.append({"folder": prefix.rstrip("/") or ".", "nights": night_list[::-1], "names": names,
                    "summary": summary if isinstance(summary, dict) else None, "error": summary_error})
    return out
