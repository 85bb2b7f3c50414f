"""The wheel ships the recipes and the license; `selfkd sweep --recipe NAME` runs a packaged recipe."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from selfkd.cli import main, recipes

ROOT = Path(__file__).parents[1]


def test_wheel_has_recipes_license_and_spdx_metadata(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("selfkd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"selfkd/recipes/{n}.yaml" for n in recipes()} <= set(names)
    assert any(n.endswith("licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in meta
    for extra in ("hf", "lightning", "tensorboard", "export", "lora", "test"):
        assert f"Provides-Extra: {extra}" in meta


@pytest.mark.parametrize("name", sorted(recipes()))
def test_packaged_recipe_plans(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--recipe", name, "--plan"]) == 0
    assert f"runs/{name}" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # plan writes nothing


def test_recipe_errors(capsys):
    assert main(["sweep", "--recipe", "nope"]) == 2
    assert "--recipe nope: unknown; known: digits-methods, digits-noise" in capsys.readouterr().err
    assert main(["sweep"]) == 2
    assert "give a SWEEP_FILE or --recipe NAME" in capsys.readouterr().err
