"""The package's layers, read from the source: a module imports only its own layer and those below it.

data -> models -> methods -> engine -> experiments | integrations -> cli; errors, plugins,
distributed and nn_utils sit under everything (they import only errors). Function-level imports count too.
"""
import ast
from pathlib import Path

import selfkd

ROOT = Path(selfkd.__file__).parent
RANK = {"errors": -1, "plugins": 0, "distributed": 0, "nn_utils": 0, "data": 1, "models": 2, "methods": 3, "engine": 4,
        "experiments": 5, "integrations": 5, "cli": 6}


def layer_of(parts: tuple[str, ...]) -> str:
    return Path(parts[0]).stem


def imported_layers(path: Path, root: Path = ROOT) -> set[str]:
    """The selfkd top-level modules a module imports (absolute or relative, at any depth)."""
    here = ("selfkd", *path.relative_to(root).parts[:-1])  # the module's package
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else ()
            full = base + tuple(node.module.split(".")) if node.module else base
            if full[:1] != ("selfkd",):
                continue
            out.update(a.name for a in node.names) if len(full) == 1 else out.add(full[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("selfkd."))
    return {x for x in out if x in RANK}


def test_every_module_has_a_layer():
    tops = {p.stem for p in ROOT.iterdir() if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert tops - {"__init__", "__main__"} <= set(RANK), tops - set(RANK)


def test_lower_layers_never_import_upper_ones():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        own = path.relative_to(ROOT).parts
        if own in (("__init__.py",), ("__main__.py",)):
            continue  # the package's lazy front door and `python -m selfkd`
        me = layer_of(own)
        for other in imported_layers(path):
            if RANK[other] > RANK[me] or (RANK[other] == RANK[me] and other != me):
                bad.append(f"{path.relative_to(ROOT)} imports selfkd.{other}")
    assert not bad, bad


def test_the_checker_sees_relative_absolute_and_function_level_imports(tmp_path):
    fake = tmp_path / "selfkd"
    (fake / "data" / "sub").mkdir(parents=True)
    mod = fake / "data" / "sub" / "x.py"
    mod.write_text("import torch\nfrom . import y\nfrom .. import augment\nimport selfkd.cli\n"
                   "def f():\n    from ...engine.trainer import train_run\n    from ... import distributed\n"
                   "    from selfkd.experiments import sweep\n")
    assert imported_layers(mod, fake) == {"data", "engine", "distributed", "cli", "experiments"}


def test_engine_is_the_trainer_not_the_experiment_tooling():
    assert not (ROOT / "engine" / "sweep.py").exists() and not (ROOT / "engine" / "report.py").exists()
    from selfkd.experiments.report import build_report  # noqa: F401
    from selfkd.experiments.sweep import run_sweep  # noqa: F401
