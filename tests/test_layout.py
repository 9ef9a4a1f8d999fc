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


def _functions():
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def test_functions_are_short():
    """No function of the three packages is over 60 lines; ``train`` reads in one screen."""
    long = [f"{path}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for path, node in _functions()
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            or (str(path) == "ldm/trainer/train.py" and node.name == "train" and node.end_lineno - node.lineno >= 40)]
    assert not long, long


def test_no_tuples_written_for_their_side_effects():
    """``a.eval(), b.eval()`` builds a tuple to throw away: one call per statement."""
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in _files()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Expr) and isinstance(node.value, ast.Tuple)]
    assert not found, found


def test_methods_and_stages_are_asked_not_tested():
    """The trainer asks the run's fine-tuning method and stage what to do: which method runs is tested only in
    the method registry, and the super-resolution stage's factor is known only to its module."""
    allowed = {"ldm/methods/registry.py", "ldm/trainer/superres.py"}
    found = [f"{path.relative_to(ROOT)}:{i}" for path in (ROOT / "ldm").rglob("*.py")
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if ("finetune.method ==" in line or "upscale_factor" in line)
             and str(path.relative_to(ROOT)) not in allowed]
    assert not found, found
