"""The package layout of CONTRIBUTING.md, checked from the source: each folder is one role, imports only point
down the layers (function-level imports included), and no two modules import each other, directly or through
others."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peft_cp_merge"

# role -> layer; a module may import its own role or a lower layer, never a higher one or a sibling role
LAYERS = {
    "errors": -1,  # layer 0 of CONTRIBUTING.md, below its siblings: "nothing of the package (but errors)"
    "_lazy": 0, "_schema": 0, "_io": 0, "_yaml": 0, "_version": 0,
    "methods": 1, "config": 1,
    "integrations": 2, "files": 2, "models": 2,
    "library": 3,
    "demo": 4,
    "cli": 5,
    "__init__": 6,
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__") or "__init__"
        yield name, path


def _imports(name: str, path: Path) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (``peft_cp_merge.`` prefix dropped)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    if name == "__init__":
        here = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("peft_cp_merge"):
                mod = node.module.removeprefix("peft_cp_merge").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import x` may import the submodule x
                found.add(f"{mod}.{alias.name}".lstrip(".") if not node.module else mod)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("peft_cp_merge.") for a in node.names if a.name.startswith("peft_cp_merge.")}
    return {m or "__init__" for m in found}


def _role(module: str) -> str:
    return module.split(".")[0]


def test_imports_point_down_the_layers():
    names = dict(_modules())
    new = {_role(n) for n in names} - set(LAYERS)
    assert not new, f"new top-level module(s) {new}: give each a layer in LAYERS and in CONTRIBUTING.md"
    wrong = []
    for name, path in names.items():
        for target in _imports(name, path):
            if _role(target) not in LAYERS or _role(target) == _role(name):
                continue
            if LAYERS[_role(target)] >= LAYERS[_role(name)]:
                wrong.append(f"{name} -> {target}")
    assert wrong == [], f"imports against the layering: {wrong}"


def test_no_import_cycles():
    names = dict(_modules())
    graph = {n: {t for t in _imports(n, p) if t in names and t != n} for n, p in names.items()}
    # a package __init__ that lazily names its submodules is not an import of them; drop package -> own child edges
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state, cycle = {}, []

    def visit(n, stack):
        state[n] = 1
        for t in graph.get(n, ()):
            if state.get(t) == 1:
                cycle.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert cycle == [], f"import cycles: {cycle}"


def test_the_layout_checker_sees_imports():
    """The checks above would pass vacuously if the parser found nothing: spot-check known edges."""
    names = dict(_modules())
    assert "methods" in _imports("integrations.peft", names["integrations.peft"])
    assert "files.merge" in _imports("library.library", names["library.library"])  # a function-level import
    assert "errors" in _imports("__init__", names["__init__"])
