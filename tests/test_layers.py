"""The layers go one way: the app, the stores and the importer import neither Dagster nor the code location
(orchestration wraps store and importer; the app reads store), checked by importing every module and by reading
every import statement, the ones inside functions included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_app_the_stores_and_the_importer_import_no_dagster():
    code = ("import importlib, pkgutil, sys\n"
            "for pkg in ('app', 'store', 'importer'):\n"
            "    mod = importlib.import_module(pkg)\n"
            "    for m in pkgutil.iter_modules(mod.__path__):\n"
            "        if m.name != '__main__' or pkg == 'app': importlib.import_module(pkg + '.' + m.name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('dagster', 'orchestration')\n"
            "              or m.startswith('dagster_')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported Dagster or orchestration: {out.stdout}"


def test_no_import_anywhere_in_a_module_crosses_the_layers():
    """Also the imports inside functions, which importing the modules above does not run."""
    import ast

    root = Path(__file__).resolve().parent.parent
    # A package may import only from the layers below it (nanochat is the bottom: it imports none of these). The
    # one Dagster import allowed below orchestration is dagster_pipes, the dependency-free child side of Pipes.
    forbidden = {"nanochat": {"app", "store", "importer", "orchestration", "dagster"},
                 "store": {"app", "importer", "orchestration", "dagster"},
                 "importer": {"app", "orchestration", "dagster"},
                 "app": {"orchestration", "importer", "dagster"}}
    crossings = []
    for pkg, banned in forbidden.items():
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                crossings += [f"{path.relative_to(root)}:{node.lineno} imports {n}" for n in names
                              if n.split(".")[0] in banned or (n.startswith("dagster_") and n != "dagster_pipes")]
    assert not crossings, "\n".join(crossings)
