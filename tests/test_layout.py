"""The code's layout: no import cycles between the project's modules, counting imports inside functions;
`ldm` imports nothing from `autoencoder`; no function in the training path is long."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "autoencoder", "pipelines")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules}
    return found - {name}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_ldm_and_pipelines_import_nothing_from_autoencoder():
    graph = _graph()
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "autoencoder")
           for m, deps in graph.items() if m.split(".")[0] in ("ldm", "pipelines")}
    assert not any(bad.values()), bad
    assert not any(d.split(".")[0] == "ldm" for m, deps in graph.items() if m.startswith("pipelines") for d in deps)


def test_training_functions_are_short():
    """``train`` reads in one screen; no function in the training path is over 60 lines."""
    long = []
    for name in ("ldm/train.py", "ldm/engine.py", "ldm/objective.py", "ldm/batches.py", "ldm/validation.py",
                 "ldm/export.py", "ldm/models.py", "ldm/splits.py", "ldm/cache.py", "autoencoder/train.py"):
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60 or (node.name == "train" and length > 40):
                    long.append(f"{name}:{node.name} ({length} lines)")
    assert not long, long
