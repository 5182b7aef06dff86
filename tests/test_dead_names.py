"""No dead names: every name a module of the package defines at its top level (a constant, a
function, a class) is used, in its own module or by a module that imports that module (the
package, its tests, benchmarks or MPI scripts). A name nothing reads misleads a reader into
thinking it matters."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: names that exist for tools outside the package (logging, ``import *``, packaging)
CONVENTIONAL = {"log", "logger", "__all__", "__version__"}


def _sources() -> dict[str, str]:
    folders = ("numba_recon", "tests", "benchmarks", "mpi_scripts")
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
            for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))
            if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)}


def _top_level_names(tree: ast.Module) -> list[tuple[str, int]]:
    names = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names += [(t.id, node.lineno) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append((node.target.id, node.lineno))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append((node.name, node.lineno))
    return names


def dead_names(sources: dict[str, str]) -> list[str]:
    """``path:line name`` of each top-level name of ``numba_recon/`` that nothing reads."""
    dead = []
    for path, text in sources.items():
        if not path.startswith("numba_recon/"):
            continue
        module = path[:-3].replace("/", ".").removesuffix(".__init__")
        leaf = module.rsplit(".", 1)[-1]
        importers = [t for p, t in sources.items()
                     if p != path and (module in t or re.search(rf"import [^\n]*\b{leaf}\b", t))]
        for name, line in _top_level_names(ast.parse(text)):
            if name in CONVENTIONAL:
                continue
            word = re.compile(rf"\b{re.escape(name)}\b")
            if len(word.findall(text)) <= 1 and not any(word.search(t) for t in importers):
                dead.append(f"{path}:{line} {name}")
    return dead


def test_no_dead_names():
    assert dead_names(_sources()) == []


def test_the_rule_sees_a_dead_name_and_an_imported_one():
    sources = {"numba_recon/a.py": "USED = 1\nDEAD = 2\nEXPORTED = 3\nprint(USED)\n",
               "numba_recon/b.py": "from numba_recon.a import EXPORTED\n",
               "tests/test_c.py": "DEAD = 'a name of its own, in a file that reads another module'\n"}
    assert dead_names(sources) == ["numba_recon/a.py:2 DEAD"]
