"""Every shipped recipe in configs/ validates (plan mode: nothing runs, nothing is written)."""
from pathlib import Path

import pytest

from selfkd.experiments.sweep import run_sweep

RECIPES = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*/*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 6


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates(path, tmp_path):
    result = run_sweep(str(path), only_plan=True, out=str(tmp_path / "out"), log=lambda m: None)
    assert result["pending"] > 0 and result["failed"] == 0
    assert not (tmp_path / "out").exists()
