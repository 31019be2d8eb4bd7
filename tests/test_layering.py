"""The library never imports a command: no module of ``algm_viz`` outside ``algm_viz/cli/`` (the app and
``app.py`` included) imports ``algm_viz.cli``, neither in its source nor when it runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "algm_viz"
COMMANDS = "algm_viz.cli"
#: ``python -m algm_viz``: the console entry point itself, not library code.
ENTRY_POINTS = {PACKAGE / "__main__.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, relative imports resolved to
    absolute names; ``from P import N`` yields both ``P`` and ``P.N`` (``N`` may be a submodule)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def is_command(name: str) -> bool:
    return name == COMMANDS or name.startswith(COMMANDS + ".")


def library_files() -> list[Path]:
    files = [p for p in PACKAGE.rglob("*.py") if PACKAGE / "cli" not in p.parents and p not in ENTRY_POINTS]
    return sorted(files) + [ROOT / "app.py"]


def test_the_walk_resolves_relative_imports():
    nested = PACKAGE / "app" / "ui.py"
    assert "algm_viz.evaluation.compare" in imported_modules(nested)
    assert any(is_command(name) for name in imported_modules(PACKAGE / "__main__.py"))  # the walk sees ``from .cli``


def test_no_library_module_imports_a_command_module():
    files = library_files()
    assert PACKAGE / "app" / "ui.py" in files and PACKAGE / "evaluation" / "compare.py" in files
    offenders = {str(path.relative_to(ROOT)): sorted(n for n in imported_modules(path) if is_command(n))
                 for path in files}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_importing_the_app_loads_no_command_module():
    code = ("import sys, algm_viz.app, algm_viz.evaluation; "
            f"print(sorted(m for m in sys.modules if m == {COMMANDS!r} or m.startswith({COMMANDS + '.'!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", result.stdout
