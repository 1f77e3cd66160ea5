"""The sources themselves: every Python file compiles without a warning, and README's Layout names every module."""

from __future__ import annotations

import warnings

import pytest

from conftest import REPO as ROOT
SOURCES = sorted(p for folder in ("ecg_mlflow", "entrypoints", "bench", "tests") for p in (ROOT / folder).glob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles_without_warnings(path):
    # An invalid escape sequence in a docstring is a SyntaxWarning now and an error in a later Python.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout") + 1)]
    modules = [p.name for p in (ROOT / "ecg_mlflow").glob("*.py") if p.name != "__init__.py"]
    assert len(modules) > 20
    assert [m for m in modules if f"`ecg_mlflow/{m}`" not in layout] == []
