"""The package's import graph: each module imports only from the layers below it, so there are no circles."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bengali_empathy"

# The package's layers, lower to higher: the four shared modules, then one subpackage per layer, then the
# command line. A module may import from its own layer (its subpackage) and the ones below it.
LAYERS = [["errors"], ["_io"], ["text"], ["schema"], ["data"], ["models"], ["generation"], ["evaluation"],
          ["records"], ["training"], ["export"], ["apps"], ["cli"], ["__main__", "__init__"]]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
SUBPACKAGES = {"data", "models", "generation", "evaluation", "records", "training", "export", "apps"}
TOP_LEVEL = {"cli", "__main__", "__init__", "errors", "_io", "schema", "text"}


def _layer(module: str) -> int:
    """The layer of a module: its subpackage's (``data.encode`` is in ``data``'s), or its own at the top."""
    return LAYER[module.split(".")[0]]


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") or "__init__": p
            for p in PACKAGE.rglob("*.py")}


def package_imports(module: str, path: Path) -> set[str]:
    """The package modules that ``module`` imports anywhere in its file (lazy imports in functions too)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, *([node.module] if node.module else [])])
            names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
            found.update(n for n in names if n)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bengali_empathy."):
            found.add(node.module.removeprefix("bengali_empathy."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("bengali_empathy.") for a in node.names
                         if a.name.startswith("bengali_empathy."))
    return found


def test_every_module_is_in_a_subpackage_or_one_of_the_few_at_the_top():
    assert {m.split(".")[0] for m in _modules()} == SUBPACKAGES | TOP_LEVEL
    assert {m for m in _modules() if "." not in m} - SUBPACKAGES == TOP_LEVEL


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, path in _modules().items() for t in package_imports(m, path)
              if _layer(t) > _layer(m)]
    assert upward == []


def test_the_import_graph_has_no_circle():
    graph = {m: {t for t in package_imports(m, p) if t in _modules() and t != m} for m, p in _modules().items()}
    done, stack = set(), []

    def visit(m):
        assert m not in stack, " -> ".join(stack[stack.index(m):] + [m])
        if m in done:
            return
        stack.append(m)
        for t in graph[m]:
            visit(t)
        stack.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_no_file_over_450_lines_and_no_class_over_250():
    """A module one can read in a sitting: each file at most 450 lines, each class at most 250."""
    too_long = []
    for module, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 450:
            too_long.append(f"{module}: {len(text.splitlines())} lines")
        too_long += [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
                     for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ClassDef)
                     and node.end_lineno - node.lineno + 1 > 250]
    assert too_long == []
