"""The package's layers, read from the source: a module imports only its own layer and those below it.

data -> models -> methods -> engine -> experiments | integrations -> cli; errors, plugins, distributed and
the small shared helpers (nn_utils, atomic, progress_bar) sit under everything (they import only errors).
Function-level imports count too. Inside the engine and the experiment packages, the rooms have an order
of their own (ROOMS), and the layers above the engine import run-directory file names from engine.rundir.
"""
import ast
from pathlib import Path

import selfkd

ROOT = Path(selfkd.__file__).parent
RANK = {"errors": -1, "plugins": 0, "distributed": 0, "nn_utils": 0, "atomic": 0, "progress_bar": 0, "data": 1, "models": 2, "methods": 3, "engine": 4,
        "experiments": 5, "integrations": 5, "cli": 6}


def layer_of(parts: tuple[str, ...]) -> str:
    return Path(parts[0]).stem


def imported_modules(path: Path, root: Path = ROOT, typing_only: bool = True) -> set[tuple[str, ...]]:
    """Every selfkd module a module imports, as dotted parts without ``selfkd`` (``("engine", "rundir")``),
    absolute or relative, at any depth; ``from X import name`` counts as ``X.name`` too (it may be a module).
    ``typing_only=False`` skips ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    here = ("selfkd", *path.relative_to(root).parts[:-1])  # the module's package
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else ()
            full = base + tuple(node.module.split(".")) if node.module else base
            if full[:1] != ("selfkd",):
                continue
            if len(full) > 1:
                out.add(full[1:])
            out.update((*full[1:], a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(tuple(a.name.split(".")[1:]) for a in node.names if a.name.startswith("selfkd."))
    return out


def imported_layers(path: Path, root: Path = ROOT) -> set[str]:
    """The selfkd top-level modules a module imports (absolute or relative, at any depth)."""
    return {m[0] for m in imported_modules(path, root) if m and m[0] in RANK}


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


# rooms inside a package: a room imports (at run time) only rooms of a lower rank, and any of the package's
# shared modules (e.g. the engine's config, checkpoint, rundir, logs), which never import a room
ROOMS = {
    ("engine",): {"system": 0, "setup": 0, "run_state": 1, "trainer": 2, "stages": 3},
    ("experiments", "report"): {"collect": 0, "stats": 1, "plots": 2, "render": 3},
    ("experiments", "sweep"): {"spec": 0, "runner": 1, "jobs": 2},
}
RUN_FILE_NAMES = {"CHECKPOINT", "BEST", "CONFIG", "METRICS", "SUMMARY", "LABEL_NOISE", "DATA_INFO", "FAILED",
                  "TEST_CORRECT"}


def room_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for pkg, rooms in ROOMS.items():
        folder = root.joinpath(*pkg)
        for path in sorted(folder.glob("*.py")):
            if path.name == "__init__.py":
                continue  # the package's front door re-exports its rooms
            me = rooms.get(path.stem)
            for mod in imported_modules(path, root, typing_only=False):
                n = len(pkg)
                if mod[:n] != pkg or len(mod) <= n or mod[n] not in rooms or mod[n] == path.stem:
                    continue
                if me is None or rooms[mod[n]] >= me:
                    bad.append(f"{'/'.join(pkg)}/{path.name} imports {'.'.join(pkg)}.{mod[n]}")
    return sorted(set(bad))


def run_file_names_outside_rundir(root: Path = ROOT) -> list[str]:
    """Modules outside the engine that take a run-directory file name from anywhere but engine.rundir."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] == "engine":
            continue
        for mod in imported_modules(path, root):
            if mod[:1] == ("engine",) and len(mod) == 3 and mod[2] in RUN_FILE_NAMES and mod[1] != "rundir":
                bad.append(f"{path.relative_to(root)} imports {mod[2]} from engine.{mod[1]}")
    return bad


def test_rooms_import_downwards_only():
    assert not room_violations(), room_violations()


def test_run_file_names_come_from_rundir():
    assert not run_file_names_outside_rundir(), run_file_names_outside_rundir()


def test_the_room_checks_see_planted_violations(tmp_path):
    fake = tmp_path / "selfkd"
    (fake / "engine").mkdir(parents=True)
    (fake / "cli").mkdir()
    (fake / "engine" / "setup.py").write_text("from .trainer import Trainer\n")
    (fake / "engine" / "run_state.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .trainer import Trainer\nfrom . import setup\n")
    (fake / "engine" / "trainer.py").write_text("def f():\n    from selfkd.engine import stages\n")
    (fake / "cli" / "x.py").write_text("from ..engine.trainer import CONFIG\nfrom ..engine.rundir import SUMMARY\n")
    (fake / "experiments" / "report").mkdir(parents=True)
    (fake / "experiments" / "report" / "collect.py").write_text("def f():\n    from .render import build_report\n")
    (fake / "experiments" / "report" / "render.py").write_text("from .collect import find_runs\n")
    assert room_violations(fake) == ["engine/setup.py imports engine.trainer",
                                     "engine/trainer.py imports engine.stages",
                                     "experiments/report/collect.py imports experiments.report.render"]
    assert run_file_names_outside_rundir(fake) == ["cli/x.py imports CONFIG from engine.trainer"]
