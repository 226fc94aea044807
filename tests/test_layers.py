"""The layers of selfsup, read off the source with `ast`: each module imports only from its own layer or those
below it (every import, at module level or inside a function), the core imports nothing of selfsup beyond
itself, no imports form a cycle, and a package module is imported inside a function only to keep a heavy
dependency out of start-up."""
from __future__ import annotations

import ast
from pathlib import Path

import selfsup

ROOT = Path(selfsup.__file__).parent

# lowest first; a package name covers its modules ("selfsup" alone is the package's own __init__)
LAYERS = (
    ("core", ("selfsup.core", "selfsup.errors")),  # errors: the public name of core's UserError
    ("config", ("selfsup.config",)),
    ("data and nn", ("selfsup.data", "selfsup.nn")),
    ("methods", ("selfsup.methods",)),
    ("training", ("selfsup.training",)),
    # loaders and exporters of weights
    ("weights", ("selfsup.weights", "selfsup.official", "selfsup.hf", "selfsup.timm_format", "selfsup.onnx_export",
                 "selfsup.convert")),
    ("eval and viz", ("selfsup.eval", "selfsup.viz", "selfsup.bench", "selfsup.curate")),
    ("api", ("selfsup.api",)),  # what the commands do, as functions
    ("cli", ("selfsup.cli", "selfsup.commands", "selfsup.__main__", "selfsup")),
)
# package modules a function may import: they bring in matplotlib or scipy, kept out of every command's start-up
LOCAL_ONLY = {"selfsup.viz.plots", "selfsup.viz.report", "selfsup.eval.video"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        if any(module == n or (n != "selfsup" and module.startswith(n + ".")) for n in names):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


class Imports(ast.NodeVisitor):
    """The selfsup modules a module imports: (target, inside a function)."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: set[tuple[str, bool]] = set()
        self.depth = 0

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def add(self, target: str) -> None:
        if target == "selfsup" or target.startswith("selfsup."):
            self.found.add((target, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.rsplit(".", node.level - 1)[0] if node.level > 1 else self.package
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        for alias in node.names:  # `from . import curate` imports the module selfsup.curate
            self.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)


def edges() -> set[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import of a selfsup module by a selfsup module."""
    out = set()
    for module, path in MODULES.items():
        v = Imports(module, path.name == "__init__.py")
        v.visit(ast.parse(path.read_text(), str(path)))
        out |= {(module, target, local) for target, local in v.found if target != module}
    return out


def upward(found: set[tuple[str, str, bool]]) -> list[str]:
    """The imports of a higher layer, and those of the core that leave it."""
    bad = []
    for src, dst, local in sorted(found):
        where = "inside a function" if local else "at module level"
        if layer(dst) > layer(src):
            bad.append(f"{src} ({LAYERS[layer(src)][0]}) imports {dst} ({LAYERS[layer(dst)][0]}) {where}")
        elif src.startswith("selfsup.core") and not dst.startswith("selfsup.core"):
            bad.append(f"{src} (core) imports {dst} {where}: the core imports nothing of selfsup")
    return bad


def cycle(found: set[tuple[str, str, bool]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None: a depth-first search for an edge back to a module on the
    current path."""
    graph: dict[str, list[str]] = {}
    for src, dst, _ in sorted(found):
        graph.setdefault(src, []).append(dst)
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in graph.get(node, []):
            found_cycle = visit(nxt, path + [node])
            if found_cycle:
                return found_cycle
        done.add(node)
        return None

    return next((c for c in (visit(m, []) for m in sorted(graph)) if c), None)


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_module_imports_from_a_higher_layer():
    assert upward(edges()) == []


def test_no_import_cycles():
    assert cycle(edges()) is None
    assert cycle({e for e in edges() if not e[2]}) is None  # module level alone, what `import` itself runs


def test_function_local_imports_of_selfsup_only_keep_heavy_dependencies_out_of_start_up():
    local = sorted((src, dst) for src, dst, inside in edges() if inside and dst not in LOCAL_ONLY)
    assert local == [], "import these at the top of the module (or move the code to its layer)"


def test_the_checks_report_a_wrong_edge():
    assert upward({("selfsup.core.io", "selfsup.training.trainer", True)}) == [
        "selfsup.core.io (core) imports selfsup.training.trainer (training) inside a function"]
    assert upward({("selfsup.core.io", "selfsup.errors", False)}) == [
        "selfsup.core.io (core) imports selfsup.errors at module level: the core imports nothing of selfsup"]
    assert upward({("selfsup.weights", "selfsup.methods", False), ("selfsup.eval.run", "selfsup.viz.attention", False)}) == []
    assert cycle({("selfsup.weights", "selfsup.official", False), ("selfsup.official", "selfsup.nn", False),
                  ("selfsup.nn", "selfsup.weights", True)}) == ["selfsup.nn", "selfsup.weights", "selfsup.official",
                                                                 "selfsup.nn"]
    assert cycle({("selfsup.weights", "selfsup.official", False), ("selfsup.official", "selfsup.nn", False)}) is None
