"""Seeds as Ray tasks: ``swarmnet sim explore|nightly --cluster ADDRESS``.

The same jobs as :mod:`.jobs` (one simulated run each, :func:`run_job`), run
as Ray tasks of one CPU each over every core of the cluster, a bounded
window of them in flight.  A task runs in a Ray worker started with
``PYTHONHASHSEED=0`` (the task's runtime environment; the simulation's
string hashing must not vary), in a scratch directory of its host, and
sends back its result line; a failing run's directory (and, with
``--keep-passing``, every run's) comes back with it as a tar archive
through Ray's object store and is unpacked into the controller's runs
directory, so no filesystem is shared.  The seed decides the run, not the
host: the verdicts' history and faults hashes match a local run's.

A task whose host is lost is retried elsewhere by Ray (the run is exact,
so a retry is the same run).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .determinism import HASH_SEED

IN_FLIGHT_PER_CORE = 2  # queued behind each core, so that none waits for the driver
TASK_RETRIES = 2  # after a lost host or worker; a run's own failure is a result, not retried
RUN_PRUNED = ("nodes",)


def pack(run_dir: Path) -> bytes:
    """``run_dir`` as a gzipped tar, its entries under the directory's own name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=3) as tar:
        tar.add(run_dir, arcname=run_dir.name)
    return buf.getvalue()


def unpack(bundle: bytes, runs_dir: Path) -> Path:
    """A packed run directory, under ``runs_dir`` (a new name if taken); its path."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
        names = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        if len(names) != 1:
            raise ValueError(f"a run's bundle holds {sorted(names)}, not one directory")
        (name,) = names
        with tempfile.TemporaryDirectory(dir=runs_dir, prefix=".incoming-") as tmp:
            tar.extractall(tmp, filter="data")  # no absolute paths, links out or devices
            dest, n = runs_dir / name, 1
            while dest.exists():
                n += 1
                dest = runs_dir / f"{name}-{n}"
            os.replace(Path(tmp) / name, dest)
    return dest


def portable(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with the controller's files it names (a scenario file, a schedule) carried
    as text: a host cannot read the controller's disk."""
    out = dict(job)
    for key in ("scenario", "schedule"):
        if out.get(key) and Path(out[key]).is_file():
            path = Path(out.pop(key))
            out[f"{key}_file"] = {"name": path.name, "text": path.read_text(encoding="utf-8")}
    return out


def _materialise(job: dict[str, Any], where: Path) -> dict[str, Any]:
    out = dict(job)
    for key in ("scenario", "schedule"):
        f = out.pop(f"{key}_file", None)
        if f is not None:
            (where / f["name"]).write_text(f["text"], encoding="utf-8")  # the name is the scenario's name
            out[key] = str(where / f["name"])
    return out


def run_seed(job: dict[str, Any]) -> dict[str, Any]:
    """One simulated run on a cluster host (a Ray task): its result line, with its run
    directory packed in ``bundle`` when it failed or ``job["prune"]`` is false."""
    import ray

    from .__main__ import run_job

    node = ray.get_runtime_context().get_node_id()
    if sys.flags.hash_randomization:
        return {"seed": job["seed"], "variant": job.get("variant", 0), "key": job.get("key"), "valid": None,
                "node_id": node, "error": f"this worker hashes strings randomly (PYTHONHASHSEED is not {HASH_SEED})"}
    scratch = Path(tempfile.mkdtemp(prefix="swarmnet-seed-"))
    try:
        (scratch / "in").mkdir()
        out = run_job({**_materialise(job, scratch / "in"), "runs_dir": str(scratch / "runs")})
        out["node_id"] = node
        run_dir = Path(out.pop("run_dir")) if out.get("run_dir") else None
        if run_dir is not None and run_dir.is_dir() and (out.get("valid") is not True or not job.get("prune")):
            out["bundle"] = pack(run_dir)
        return out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_jobs_cluster(address: str, jobs: list[dict[str, Any]], on_result: Callable[[dict], Any] | None = None,
                     stop_when: Callable[[dict], bool] | None = None,
                     progress: Callable[[str], None] = lambda m: None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``jobs`` (as :func:`chaos.sim.jobs.run_jobs` takes them) as Ray tasks on the
    cluster at ``address``; their results (run directories brought home into each job's
    ``runs_dir``) and what ran where (``{"hosts": {name: cores}, "cores": n}``)."""
    from testnet.cluster.driver import check_hosts, connect, disconnect

    ray = connect(address)
    try:
        hosts = check_hosts(ray)
        by_node = {h.node_id: h.name for h in hosts}
        cores = sum(h.cpus for h in hosts)
        progress(f"cluster {address}: {len(hosts)} hosts, {cores} cores")
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False,
                          runtime_env={"env_vars": {"PYTHONHASHSEED": HASH_SEED}})(run_seed)
        todo = list(enumerate(jobs))
        todo.reverse()
        pending: dict[Any, tuple[int, dict[str, Any]]] = {}
        results: list[dict[str, Any]] = []
        window = max(1, cores * IN_FLIGHT_PER_CORE)
        try:
            while todo or pending:
                while todo and len(pending) < window:
                    i, job = todo.pop()
                    pending[task.remote(portable(job))] = (i, job)
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                i, job = pending.pop(ref)
                r = _result(ray, ref, job)
                r["host"] = by_node.get(r.pop("node_id", None), "?")
                results.append(r)
                if on_result:
                    on_result(r)
                if stop_when is not None and stop_when(r):
                    break
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        return results, {"hosts": {h.name: h.cpus for h in hosts}, "cores": cores}
    finally:
        disconnect()


def _result(ray: Any, ref: Any, job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        r = ray.get(ref)
    except Exception as exc:  # the task itself failed (its host lost past the retries, a crash)
        return {"seed": job["seed"], "variant": job.get("variant", 0), "key": job.get("key"), "valid": None,
                "error": f"{type(exc).__name__}: {str(exc)[:400]}", "wall_s": round(time.monotonic() - t0, 2)}
    bundle = r.pop("bundle", None)
    if bundle is not None:
        r["run_dir"] = str(unpack(bundle, Path(job.get("runs_dir", "runs")).absolute()))
        r["bundle_bytes"] = len(bundle)
    return r
