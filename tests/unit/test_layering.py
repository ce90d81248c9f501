"""DESIGN §1's dependency rules, checked on the source with `ast` (nothing is imported).

Every import statement counts, including those inside functions (lazy imports are still
dependencies). "Ours" means the project's packages: baton, engine, kvtransfer, prefill_worker,
decode_worker, router, cluster. baton.wire (proto <-> engine type conversions, torch-free),
baton.cluster_token (the internal calls' shared secret), baton.cluster_tls (their mutual TLS) and
baton.worker (the workers' server shell) are shared gRPC helpers and obey the workers' rules themselves; the router may use
baton.wire, baton.cluster_token and baton.cluster_tls.

Transitive checks ("never reaches torch", "pure cores import no I/O library") follow what runs when
a module is imported: the checked file's own imports at any depth, and the module-level imports of
every module of ours it reaches (a function-level `import redis` in router/registry.py does not make
router/routing.py, which imports only its WorkerInfo, depend on redis). The router's torch rule
follows every import at any depth: the router process must never load torch.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
OURS = ("baton", "engine", "kvtransfer", "prefill_worker", "decode_worker", "router", "cluster")
WORKER_SHARED = ("baton.v1", "baton.metrics", "baton.wire", "baton.cluster_token",
                 "baton.cluster_tls", "baton.worker")
ROUTER_ENGINE = ("engine.tokenizer", "engine.request", "engine.config", "engine.stats",
                 "engine.radix_cache")
ROUTER_ALLOWED = ("baton.v1", "baton.metrics", "baton.wire", "baton.cluster_token",
                  "baton.cluster_tls", *ROUTER_ENGINE)
PURE_CORES = ("engine/block_pool.py", "engine/radix_cache.py", "engine/scheduler.py",
              "engine/stats.py", "router/routing.py", "router/prefix_index.py",
              "cluster/autoscaling.py")
IO_LIBS = ("torch", "grpc", "ray", "redis", "prometheus_client")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(*packages: str) -> list[Path]:
    files: list[Path] = []
    for package in packages:
        files += sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """Nodes that run at import: the body, descending into if/try/with but not into defs, nor
    into `if TYPE_CHECKING:` (imports for annotations only, never executed)."""
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                   "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        nodes.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ClassDef):
            todo.extend(n for n in node.body
                        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return nodes


@cache
def imports_of(path: Path, module_level_only: bool = False) -> frozenset[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in (_module_level(tree) if module_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # `from pkg import mod` may import a submodule: count pkg.mod when that file exists
            for alias in node.names:
                candidate = f"{prefix}.{alias.name}"
                if module_path(candidate) is not None:
                    names.add(candidate)
    return frozenset(names)


def module_path(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def within(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def ours(names: frozenset[str]) -> set[str]:
    return {n for n in names if within(n, OURS)}


def transitive_imports(path: Path, *, lazy_everywhere: bool = False) -> set[str]:
    """Every module reached from `path` through our own modules (parents' __init__ included):
    `path`'s imports at any depth, the others' module-level ones (all of them if lazy_everywhere)."""
    seen: set[str] = set()
    todo = [path]
    visited: set[Path] = set()
    while todo:
        current = todo.pop()
        if current in visited:
            continue
        visited.add(current)
        for name in imports_of(current, module_level_only=current != path and not lazy_everywhere):
            seen.add(name)
            if within(name, OURS):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    found = module_path(".".join(parts[:i]))
                    if found is not None:
                        todo.append(found)
    return seen


def violations(packages: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    bad = []
    for path in source_files(*packages):
        for name in sorted(ours(imports_of(path))):
            if not within(name, packages) and not within(name, allowed):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


def test_engine_imports_none_of_the_others():
    assert violations(("engine",), ()) == []


def test_kvtransfer_imports_engine_and_protos_only():
    assert violations(("kvtransfer",), ("engine", "baton.v1", "baton.metrics")) == []


@pytest.mark.parametrize("package", ["prefill_worker", "decode_worker"])
def test_workers_import_engine_kvtransfer_protos(package):
    assert violations((package,), ("engine", "kvtransfer", *WORKER_SHARED)) == []


def test_worker_shared_helpers_obey_the_workers_rules():
    bad = []
    for name in ("baton.wire", "baton.cluster_token", "baton.worker"):
        path = module_path(name)
        if path is None:
            continue
        for imported in sorted(ours(imports_of(path))):
            if not within(imported, ("engine", "kvtransfer", *WORKER_SHARED)):
                bad.append(f"{name} imports {imported}")
    assert bad == []


def test_router_imports_protos_and_torch_free_engine_modules():
    assert violations(("router",), ROUTER_ALLOWED) == []


def test_router_never_reaches_torch():
    bad = []
    for path in source_files("router"):
        reached = transitive_imports(path, lazy_everywhere=True)
        bad += [f"{path.relative_to(REPO)} reaches {n}" for n in sorted(reached) if within(n, ("torch",))]
    assert bad == []


def test_torch_free_engine_modules_stay_torch_free():
    bad = []
    for name in ROUTER_ENGINE:
        path = module_path(name)
        if path is not None:
            reached = transitive_imports(path, lazy_everywhere=True)
            bad += [f"{name} reaches {n}" for n in sorted(reached) if within(n, ("torch",))]
    assert bad == []


def test_cluster_is_imported_only_by_the_cli():
    bad = []
    for path in source_files(*(p for p in OURS if p != "cluster")):
        if module_name(path) == "baton.cli":
            continue
        bad += [f"{path.relative_to(REPO)} imports {n}" for n in sorted(imports_of(path))
                if within(n, ("cluster",))]
    assert bad == []


def test_proto_is_not_a_python_package():
    assert (REPO / "proto").is_dir()
    assert sorted((REPO / "proto").rglob("__init__.py")) == []
    assert sorted((REPO / "proto").rglob("*.py")) == []


def test_the_sdk_and_the_cli_do_not_pull_in_the_server_side():
    """`baton --help` and `import baton` stay light: no torch at import time anywhere in baton/."""
    bad = []
    for path in source_files("baton"):
        if module_name(path) in ("baton.worker",):  # the workers' shell, imported by workers only
            continue
        light = ("__init__", "options", "engine_config", "kvtransfer_config",  # the CLI's flags
                 "serve_config", "serve_report", "serve_workloads", "compare_config")
        if within(module_name(path), ("baton.bench",)) and path.stem not in light:
            continue  # measuring code, imported only once `baton bench` runs
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: the CLI imports heavy things lazily
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{path.relative_to(REPO)} imports {m} at module level" for m in mods
                        if within(m, ("torch", "ray", "cluster", "engine.engine", "engine.weights"))]
    assert bad == []


def existing_pure_cores() -> list[str]:
    return [c for c in PURE_CORES if (REPO / c).is_file()]


@pytest.mark.parametrize("core", existing_pure_cores() or [pytest.param(
    None, marks=pytest.mark.skip(reason="no pure core module exists yet"))])
def test_pure_cores_import_no_io_libraries(core):
    reached = transitive_imports(REPO / core)
    assert sorted(n for n in reached if within(n, IO_LIBS)) == []


# ---- the checker itself ------------------------------------------------------------------------


def test_checker_sees_lazy_relative_and_from_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub.py").write_text("")
    (pkg / "mod.py").write_text(
        "def f():\n    import torch\n    from router import server\nfrom . import sub\n"
        "from .sub import x\nfrom cluster.launcher import serve\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", tmp_path)
    imports_of.cache_clear()
    try:
        names = imports_of(pkg / "mod.py")
        assert {"torch", "router", "engine", "engine.sub", "cluster.launcher"} <= names
        top = imports_of(pkg / "mod.py", module_level_only=True)
        assert "torch" not in top and "router" not in top and "cluster.launcher" in top
        assert violations(("engine",), ()) == [
            "engine/mod.py imports cluster.launcher", "engine/mod.py imports router",
        ]
    finally:
        imports_of.cache_clear()
