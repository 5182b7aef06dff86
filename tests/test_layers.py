"""The package's imports point one way: each module imports only modules of its own layer or of
the layers below it (docs/architecture.md, "Layers"), and no two modules import each other, directly
or through others. Every import counts, at the top of a file or inside a function; imports under
``if TYPE_CHECKING:`` (type hints only, never executed) do not."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "numba_recon"

#: Bottom to top. A module belongs to the layer of its longest matching prefix; the bare package name
#: matches only the package's own ``__init__``, so a new folder must be placed here to pass.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("numba_recon", "numba_recon.errors", "numba_recon.checks", "numba_recon.threads",
              "numba_recon.provenance", "numba_recon.manifest", "numba_recon.geometry", "numba_recon.ctf",
              "numba_recon.io.files", "numba_recon.io.run_files", "numba_recon.io.names", "numba_recon.sim",
              "numba_recon.kernel_geometry")),
    ("file formats", ("numba_recon.io",)),
    ("data model", ("numba_recon.particles", "numba_recon.plausibility", "numba_recon.symmetry",
                    "numba_recon.config", "numba_recon.sim.phantom")),
    ("particle files", ("numba_recon.io.star", "numba_recon.io.thu", "numba_recon.read")),
    ("kernels", ("numba_recon.contract", "numba_recon.cpu", "numba_recon.cuda", "numba_recon.backend")),
    ("operator", ("numba_recon.forward", "numba_recon.adjoint", "numba_recon.batch")),
    ("objective and optimiser", ("numba_recon.objective", "numba_recon.loss", "numba_recon.step")),
    ("parallel", ("numba_recon.reduce",)),
    ("stages after the step", ("numba_recon.checkpoint", "numba_recon.evaluate", "numba_recon.report",
                               "numba_recon.journal")),
    ("engine", ("numba_recon.recon", "numba_recon.sim.simulate")),
    ("tools", ("numba_recon.tools", "numba_recon.cuda.device_check", "numba_recon.cuda.acceptance",
               "numba_recon.cuda.compile_check")),
    ("command line", ("numba_recon.cli", "numba_recon.__main__")),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import submodule`` names the submodule)."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
                targets = subs + ([module] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "numba_recon" and module.startswith(prefix + "."))
            if covers and len(prefix) > best:
                best, level = len(prefix), i
    if level is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")
    return level


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(_modules()):
        if module not in index:
            visit(module)
    assert not cycles, cycles


@pytest.mark.parametrize("module,target", [("numba_recon.recon.engine", "numba_recon.cli.run"),
                                           ("numba_recon.io.star", "numba_recon.recon.engine")])
def test_the_rule_catches_an_upward_import(module, target):
    assert layer_of(target) > layer_of(module)
