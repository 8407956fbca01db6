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


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or
                                         isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks (imports made for type hints only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node) if not _type_checking(c))


def imported(path: Path, package: str, *, runtime_only: bool = False) -> set[str]:
    """Absolute module names ``path`` (a module of ``package``) imports; with ``runtime_only``, not
    those under ``if TYPE_CHECKING:`` (a part naming its owner's type is no arrow at run time)."""
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in (_runtime_nodes(tree) if runtime_only else ast.walk(tree)):
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
    probe.write_text("from testnet.controller import Testnet\nimport chaos.run.runner\nfrom testnet.base import crypto\n"
                     "from .core import x\n")
    mods = imported(probe, "nodes")
    assert "nodes.core" in mods and "testnet.base.crypto" in mods
    assert above_foundations(mods, own="nodes") == ["chaos.run.runner", "testnet.controller", "testnet.controller.Testnet"]
    # From clients, importing nodes reaches past the foundations too.
    assert "nodes.core" in above_foundations(imported(probe, "nodes"), own="clients")
    # From the controller, node code (even one module's name) is out of reach.
    from_controller = imported(probe, "testnet")
    assert "testnet.core.x" in from_controller and above_the_controller(from_controller) == ["chaos.run.runner"]
    probe.write_text("from clients.client import Client\nimport nodes.bench\n")
    assert above_the_controller(imported(probe, "testnet")) == ["clients.client", "clients.client.Client",
                                                               "nodes.bench"]


# --------------------------------------------------------------------------- chaos's rooms

def _module_files() -> dict[str, Path]:
    """Module name -> file, for every module of chaos, testnet, nodes and clients."""
    out = {}
    for top in ("chaos", "testnet", "nodes", "clients"):
        for f in (ROOT / top).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _modules_imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that ``name`` imports (a name that is an attribute counts as its module)."""
    out = set()
    for m in imported(path, _package_of(name, path), runtime_only=True):
        while m and m not in known:
            m = m.rpartition(".")[0]
        if m and m != name:
            out.add(m)
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


# room -> the rooms of chaos it may import (besides itself), and other prefixes it must not import.
VOCABULARY = {"scenario", "schedule"}
NO_NETWORK = ("trio", "testnet.controller", "testnet.procs", "testnet.links", "testnet.registry", "testnet.cli",
              "nodes.server", "clients.client.Client", "clients.workload")
ROOMS: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "scenario": (set(), ("trio", "testnet.", "nodes", "clients")),
    "schedule": ({"scenario"}, ("trio", "testnet.", "nodes", "clients")),
    "checkers": (set(), ("testnet.controller", "testnet.procs", "testnet.links", "testnet.cli", "clients.workload")),
    "trace": ({"checkers"} | VOCABULARY, NO_NETWORK),
    "report": ({"checkers", "trace"} | VOCABULARY, NO_NETWORK),
    "adversary": ({"run.nemesis", "checkers.authority"} | VOCABULARY, ("testnet.controller", "testnet.cli")),
    "fuzz": (set(), ()),
    "run": ({"checkers", "report", "adversary"} | VOCABULARY, ()),
    "sim": ({"run", "checkers", "report", "adversary"} | VOCABULARY, ()),
    # swarmnet serve watches and acts only through run directories and the control API: it never starts
    # a network, signals a process or talks to Toxiproxy itself.
    "web": ({"report", "trace"} | VOCABULARY, ("testnet.controller", "testnet.boot", "testnet.launch",
                                               "testnet.links", "testnet.registry", "nodes", "clients")),
}


def room_violations(graph: dict[str, set[str]], raw: dict[str, set[str]]) -> dict[str, list[str]]:
    """Per chaos module, the imports its room's rules forbid."""
    bad: dict[str, list[str]] = {}
    for mod, deps in graph.items():
        if not mod.startswith("chaos.") or _room(mod) not in ROOMS:
            continue
        room = _room(mod)
        allowed, forbidden = ROOMS[room]
        found = []
        for d in deps:
            if d.startswith("chaos.") and _room(d) != room:
                rest = d[len("chaos."):]
                if not any(rest == a or rest.startswith(a + ".") for a in allowed):
                    found.append(d)
        found += [m for m in raw[mod] if any(m == f.rstrip(".") or m.startswith(f if f.endswith(".") else f + ".")
                                             or m == f for f in forbidden)]
        if found:
            bad[mod] = sorted(set(found))
    return bad


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = _module_files()
    graph, raw = {}, {}
    for name, path in known.items():
        graph[name] = {m for m in _modules_imported(name, path, known) if not name.startswith(m + ".")}
        raw[name] = imported(path, _package_of(name, path))
    return graph, raw


def test_each_room_of_chaos_imports_only_what_its_docstring_allows():
    graph, raw = _graph()
    rooms = {_room(m) for m in graph if m.startswith("chaos.")}
    assert set(ROOMS) <= rooms, "a room named in the rules is gone"
    for room in rooms - VOCABULARY:
        doc = ast.get_docstring(ast.parse((ROOT / "chaos" / room / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "import" in doc, f"chaos/{room}/__init__.py must say what the room may import"
    assert room_violations(graph, raw) == {}


def test_no_import_circles():
    graph, _ = _graph()
    assert import_cycles(graph) == []


def test_the_room_and_circle_checks_can_fail():
    graph = {"chaos.trace.view": {"chaos.run.runner"}, "chaos.run.runner": {"chaos.trace.view"},
             "chaos.checkers.delivery": {"chaos.run.runner"}, "chaos.report.page": set()}
    raw = {"chaos.trace.view": {"chaos.run.runner"}, "chaos.run.runner": {"chaos.trace.view"},
           "chaos.checkers.delivery": {"chaos.run.runner"}, "chaos.report.page": {"trio", "testnet.controller"}}
    assert room_violations(graph, raw) == {
        "chaos.checkers.delivery": ["chaos.run.runner"], "chaos.report.page": ["testnet.controller", "trio"],
        "chaos.run.runner": ["chaos.trace.view"], "chaos.trace.view": ["chaos.run.runner"]}
    assert import_cycles(graph) == [["chaos.run.runner", "chaos.trace.view"]]
