"""The code's layout: the layers of `docs/architecture.md` and which may import which (counting imports inside
functions), no import cycles, a short `ldm/` top level with no demos in it, and no long functions."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "autoencoder", "pipelines")

# What each layer may import of the project besides itself, lowest layer first. `ldm` itself holds the commands
# (`python -m ldm.generate`, ...), which may use every layer; `demos/` (outside the packages) may import anything
# and nothing imports it.
LOWER = ["ldm.diffusion", "ldm.engine", "ldm.data", "ldm.models", "ldm.eval", "ldm.methods", "ldm.trainer"]
ALLOWED = {
    "pipelines": set(),
    "ldm.diffusion": set(),
    "ldm.engine": {"pipelines"},
    "ldm.data": {"ldm.engine", "pipelines"},
    "ldm.models": {"ldm.diffusion", "ldm.engine", "ldm.data", "pipelines"},
    "ldm.eval": {"ldm.diffusion", "ldm.engine", "ldm.data", "ldm.models", "pipelines"},
    "ldm.methods": {"ldm.diffusion", "ldm.engine", "ldm.data", "ldm.models", "pipelines"},
    "ldm.trainer": {*LOWER[:-1], "pipelines"},
    "ldm": {*LOWER, "pipelines"},
    "autoencoder": {"ldm.engine", "ldm.data", "ldm.models", "ldm.eval", "pipelines"},
}
MAX_TOP_LEVEL_MODULES = 8
MAX_FUNCTION_LINES = 60


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
        found |= {t for t in targets if t in modules or t.split(".")[0] == "demos"}
    return found - {name}


def _files() -> list[Path]:
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]


def _graph() -> dict[str, set[str]]:
    files = _files()
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _layer(module: str) -> str:
    """The layer a module belongs to: its top package, or for `ldm` its subpackage (`ldm` for the commands)."""
    parts = module.split(".")
    if parts[0] == "ldm" and len(parts) > 1 and f"ldm.{parts[1]}" in ALLOWED:
        return f"ldm.{parts[1]}"
    return parts[0]


def test_every_layer_imports_only_the_layers_below_it():
    bad = {}
    for module, deps in _graph().items():
        layer = _layer(module)
        wrong = sorted(d for d in deps if _layer(d) != layer and _layer(d) not in ALLOWED[layer])
        if wrong:
            bad[module] = wrong
    assert not bad, bad


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


def test_the_ldm_top_level_is_short_and_holds_no_demos():
    top = sorted(p.name for p in (ROOT / "ldm").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    subpackages = sorted(p.name for p in (ROOT / "ldm").iterdir() if (p / "__init__.py").is_file())
    assert subpackages == sorted(layer.split(".")[1] for layer in LOWER), subpackages
    demos = [str(p.relative_to(ROOT)) for p in (ROOT / "ldm").rglob("*.py")
             if p.stem.endswith("_demo") or "studies" in p.parts or "study" in p.stem]
    assert not demos, demos


def test_training_functions_are_short():
    """No function in the training path is over 60 lines; ``train`` reads in one screen."""
    long = []
    for name in ("ldm/trainer/train.py", "ldm/engine/engine.py", "ldm/trainer/objective.py", "ldm/data/batches.py",
                 "ldm/trainer/validation.py", "ldm/trainer/export.py", "ldm/models/components.py",
                 "ldm/data/splits.py", "ldm/data/cache.py", "autoencoder/train.py"):
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES or (node.name == "train" and length > 40):
                    long.append(f"{name}:{node.name} ({length} lines)")
    assert not long, long
