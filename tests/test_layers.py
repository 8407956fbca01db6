"""The layering the folders promise, checked from the imports (AST, no import side effects):
testnet/base holds the foundations and the seams and depends on nothing above it; its
protocol, crypto, swarm-maths and record modules are pure (no trio); nodes and clients
use the foundations only, never the controller; the controller (testnet outside base)
starts nodes and clients as processes and never imports their code (or chaos's); the
registry's rule book is pure."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE = {"protocol", "crypto", "swarm", "records", "clock", "jsonl", "bugs", "limits", "cpuprofile", "cputime"}
EDGES = {"bench.py", "cli.py", "__main__.py"}  # benchmarks and commands start whole networks


def _edge(name: str) -> bool:
    return name in EDGES or name.startswith("bench_")  # a benchmark's own modules


def imported(path: Path, package: str) -> set[str]:
    """Absolute module names ``path`` (a module of ``package``) imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            mod = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else (node.module or "")
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def above_foundations(mods: set[str], own: str = "") -> list[str]:
    """The imports that reach past the foundations (``own`` package excepted): the
    controller (testnet outside base), chaos, or the other of nodes / clients."""
    return sorted(m for m in mods if m.split(".")[0] != own and (
        m.split(".")[0] in ("nodes", "clients", "chaos") or (m.startswith("testnet.") and not m.startswith("testnet.base"))))


def test_the_foundations_depend_on_nothing_above_them():
    files = sorted((ROOT / "testnet" / "base").glob("*.py"))
    assert len(files) >= 10
    bad = {}
    for f in files:
        mods = imported(f, "testnet.base")
        found = above_foundations(mods)
        if f.stem in PURE:
            found += sorted(m for m in mods if m == "trio" or m.startswith("trio."))
        if found:
            bad[f.name] = found
    assert bad == {}


def test_nodes_and_clients_use_only_the_foundations():
    bad = {}
    for d in ("nodes", "clients"):
        for f in sorted((ROOT / d).glob("*.py")):
            found = above_foundations(imported(f, d), own=d)
            if not _edge(f.name) and found:
                bad[f"{d}/{f.name}"] = found
    assert bad == {}


def above_the_controller(mods: set[str]) -> list[str]:
    """The imports of a controller module (testnet outside base) that reach node, client or chaos code."""
    return sorted(m for m in mods if m.split(".")[0] in ("nodes", "clients", "chaos"))


def test_the_controller_imports_no_node_client_or_chaos_code():
    files = sorted((ROOT / "testnet").glob("*.py"))
    assert len(files) >= 10
    bad = {f.name: found for f in files if (found := above_the_controller(imported(f, "testnet")))}
    assert bad == {}


def test_the_registry_rule_book_is_pure():
    mods = imported(ROOT / "testnet" / "registry_state.py", "testnet")
    assert "testnet.base.swarm" in mods
    assert sorted(m for m in mods if m.split(".")[0] == "trio" or m.startswith(("testnet.base.rpc", "testnet.base.net"))
                  or (m.startswith("testnet.") and not m.startswith("testnet.base"))) == []


def test_the_layer_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from testnet.controller import Testnet\nimport chaos.runner\nfrom testnet.base import crypto\n"
                     "from .core import x\n")
    mods = imported(probe, "nodes")
    assert "nodes.core" in mods and "testnet.base.crypto" in mods
    assert above_foundations(mods, own="nodes") == ["chaos.runner", "testnet.controller", "testnet.controller.Testnet"]
    # From clients, importing nodes reaches past the foundations too.
    assert "nodes.core" in above_foundations(imported(probe, "nodes"), own="clients")
    # From the controller, node code (even one module's name) is out of reach.
    from_controller = imported(probe, "testnet")
    assert "testnet.core.x" in from_controller and above_the_controller(from_controller) == ["chaos.runner"]
    probe.write_text("from clients.client import Client\nimport nodes.bench\n")
    assert above_the_controller(imported(probe, "testnet")) == ["clients.client", "clients.client.Client",
                                                               "nodes.bench"]
