"""plugin/README.md names every module of plugin/ with its job, and every module says its job."""

from __future__ import annotations

import ast
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1] / "plugin"


def _modules() -> list[Path]:
    return sorted(p for p in PLUGIN.rglob("*.py") if p.name != "__init__.py" or p.parent != PLUGIN)


def test_every_module_of_plugin_is_in_the_map_and_has_a_docstring():
    text = (PLUGIN / "README.md").read_text()
    missing, undocumented = [], []
    for path in _modules():
        rel = path.relative_to(PLUGIN)
        named = f"`{rel.as_posix()}`" in text or f"`{rel.name}`" in text or f"`{rel.parent.as_posix()}/`" in text
        if not named:
            missing.append(rel.as_posix())
        if not ast.get_docstring(ast.parse(path.read_text())):
            undocumented.append(rel.as_posix())
    assert not missing, f"plugin/README.md does not name: {missing}"
    assert not undocumented, f"modules without a docstring saying their job: {undocumented}"
