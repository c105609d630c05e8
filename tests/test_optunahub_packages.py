"""Each folder under package/samplers/ is an OptunaHub package: front matter, a LICENSE, loadable
with ``optunahub.load_local_module``, the package's own class (not a copy), a working example and
test."""

from __future__ import annotations

import runpy
from pathlib import Path

import optunahub
import pytest

from optuna_prune import search

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "package"
PACKAGES = sorted(p.name for p in (REGISTRY / "samplers").iterdir() if (p / "__init__.py").exists())
FRONT_MATTER = ("author", "title", "description", "tags", "optuna_versions", "license")


def front_matter(readme: Path) -> dict[str, str]:
    """The ``key: value`` lines between the README's opening ``---`` fences."""
    lines = readme.read_text().splitlines()
    assert lines[0] == "---", f"{readme} must open with front matter"
    end = lines.index("---", 1)
    return dict(line.split(": ", 1) for line in lines[1:end])


def test_every_sampler_has_a_package() -> None:
    assert PACKAGES == ["evop", "evopress_level_switch", "exhaustive_subset", "random_subset"]


@pytest.mark.parametrize("name", PACKAGES)
def test_package_loads_the_library_code_and_runs(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = REGISTRY / "samplers" / name
    meta = front_matter(folder / "README.md")
    assert set(FRONT_MATTER) <= set(meta) and all(meta[k].strip() for k in FRONT_MATTER)
    assert "sampler" in meta["tags"].strip("[]").split(", ")  # the registry's rule for samplers
    module = optunahub.load_local_module(f"samplers/{name}", registry_root=str(REGISTRY))
    (cls,) = (n for n in module.__all__ if n.endswith("Sampler"))
    assert getattr(module, cls) is getattr(search, cls)  # imported, not a copy
    assert module.suggest_mask is search.suggest_mask
    runpy.run_path(str(folder / "example.py"), run_name="__main__")
    best, chosen = capsys.readouterr().out.split(" ", 1)
    assert float(best) > 0 and len(eval(chosen)) == 3  # noqa: S307 - a tuple we printed
    tests = runpy.run_path(str(folder / "tests" / "test_sampler.py"))
    tests[f"test_{name}_finds_the_best_subset"]()


@pytest.mark.parametrize("name", PACKAGES)
def test_package_carries_the_project_license(name: str) -> None:
    """The registry wants a LICENSE in every package folder: the project's own, as the README says."""
    folder = REGISTRY / "samplers" / name
    assert (folder / "LICENSE").is_file(), f"{folder} needs a LICENSE file"
    text = (folder / "LICENSE").read_text()
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    assert front_matter(folder / "README.md")["license"] == "Apache License 2.0"
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert text.startswith("Copyright 2026 optuna-prune contributors\n")
