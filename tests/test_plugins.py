"""User code: register_model / register_method, --import, sweep `import:`, entry points, timm: names, and the
README's "Adding a method" example (built and trained here, so the README stays true)."""
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import selfkd
from selfkd.cli import main
from selfkd.errors import ConfigError
from selfkd.methods import registry
from selfkd import models

from handmath import hand_ce, softmax

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "confidence_penalty.py"
BASE = ["--data", "digits", "--model", "cnn_small", "--seed", "0", "--no-progress", "--set", "data.subset=200",
        "--set", "data.test_subset=100"]


@pytest.fixture(autouse=True)
def clean_registries(monkeypatch):
    """Each test sees the built-in registries and imports user modules afresh."""
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    with models.MODELS.scope(), registry.METHODS.scope():
        yield
    for name in set(sys.modules) - before:
        if name in ("confidence_penalty", "user_net", "raising_mod", "ep_pkg"):
            del sys.modules[name]


def test_register_model_builds_and_guards_names():
    @selfkd.register_model("tiny_mlp")
    def tiny(num_classes, in_channels):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    m = selfkd.build_model("tiny_mlp", num_classes=4, in_channels=1)
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 4) and "tiny_mlp" in selfkd.available_models()
    with pytest.raises(ConfigError, match="'resnet8' is a built-in model; pass allow_override=True"):
        selfkd.register_model("resnet8")(tiny)
    with pytest.raises(ConfigError, match="'tiny_mlp' is already registered"):
        selfkd.register_model("tiny_mlp")(lambda k, c: nn.Identity())
    selfkd.register_model("resnet8", allow_override=True)(tiny)
    assert isinstance(selfkd.build_model("resnet8", 10, 1), nn.Sequential)
    with pytest.raises(ConfigError, match="invalid model name"):
        selfkd.register_model("timm:x")


def test_register_method_guards_names():
    class Mine(selfkd.Method):
        name = "dlb"

    with pytest.raises(ConfigError, match="'dlb' is a built-in method; pass allow_override=True"):
        selfkd.register_method(Mine)
    assert selfkd.register_method(allow_override=True)(Mine) is Mine
    assert registry.method_class("dlb") is Mine
    with pytest.raises(ConfigError, match="expected a subclass of selfkd.Method"):
        selfkd.register_method(object)
    with pytest.raises(ConfigError, match="has no name"):
        selfkd.register_method(type("Nameless", (selfkd.Method,), {}))


def test_timm_names_parse_and_missing_timm_names_the_extra():
    with pytest.raises(ConfigError, match=r"expected timm:ARCH"):
        selfkd.build_model("timm:", 10)
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"^timm is not installed .*pip install selfkd\[timm\]$"):
            selfkd.build_model("timm:resnet18", 10)
    else:  # pragma: no cover - timm does not import beside the CPU torch used here
        assert selfkd.build_model("timm:resnet18", 10)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_entry_points_find_an_installed_package(tmp_path, monkeypatch):
    """A real distribution on sys.path (dist-info with entry_points.txt), found through importlib.metadata."""
    (tmp_path / "ep_pkg.py").write_text(textwrap.dedent("""
        import selfkd
        from torch import nn
        def net(num_classes, in_channels):
            return nn.Linear(in_channels, num_classes)
        class Half(selfkd.Method):
            name = "half-ce"
            def loss(self, logits, target, index=None):
                from selfkd.methods.losses import cross_entropy
                ce = cross_entropy(logits, target)
                return selfkd.StepOutput(0.5 * ce, {"ce": ce.detach()}, logits, target)
    """))
    info = tmp_path / "ep_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[selfkd.models]\nep_net = ep_pkg:net\n\n[selfkd.methods]\nhalf-ce = ep_pkg:Half\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert selfkd.build_model("ep_net", 3, 5).out_features == 3
    m = selfkd.build_method("half-ce")
    z, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert m(z, y).item() == pytest.approx(0.5 * hand_ce([1.0, 0.0], 0), rel=1e-6)
    assert "half-ce" in selfkd.available_methods() and "ep_net" in selfkd.available_models()


def test_cli_import_errors_are_one_line(tmp_path, capsys):
    assert main(["--import", "no_such_pkg.mod", "models"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("selfkd: error: --import no_such_pkg.mod: module not found (No module named 'no_such_pkg'); it must "
                   "be importable from the working directory or sys.path: run selfkd from its folder, set "
                   "PYTHONPATH=DIR, or give the file (--import path/to/my_mod.py)")
    (tmp_path / "raising_mod.py").write_text("raise RuntimeError('boom at import')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["models", "--import", "raising_mod"]) == 2
    finally:
        sys.path.remove(str(tmp_path))
    assert capsys.readouterr().err.strip() == ("selfkd: error: --import raising_mod: importing it raised RuntimeError: "
                                                "boom at import")


@pytest.mark.parametrize("body,said", [
    ("import sys\nsys.exit(0)\n", "the module called sys.exit(0) while being imported"),
    ("raise SystemExit('bye')\n", "the module called sys.exit('bye') while being imported"),
    ("class Stop(BaseException):\n    pass\nraise Stop()\n", "importing it raised Stop (a BaseException"),
], ids=["exit0", "systemexit", "baseexception"])
def test_cli_import_of_a_module_that_exits_is_one_line(tmp_path, body, said):
    """A plugin that ends the process at import must not pass for a finished command (exit 0)."""
    import os
    import subprocess

    (tmp_path / "exiting_mod.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "selfkd", "--import", "exiting_mod", "models"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stdout == "" and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("selfkd: error: --import exiting_mod: " + said), res.stderr


def test_readme_adding_a_method_example_is_the_file_and_trains(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    assert EXAMPLE.read_text().strip() in readme  # the README shows this very file
    # the test the README suggests: the loss against hand computation
    assert main(["--import", "confidence_penalty", "methods", "cpen"]) == 0
    assert "cpen: CE(z, y) − β·H(softmax(z))" in capsys.readouterr().out
    m = selfkd.build_method("cpen", beta=0.5)
    z, y = [0.5, -1.0, 2.0], 1
    p = softmax(z)
    want = hand_ce(z, y) - 0.5 * -sum(pi * math.log(pi) for pi in p)
    assert m(torch.tensor([z]), torch.tensor([y])).item() == pytest.approx(want, rel=1e-6)
    # and the CLI trains with it
    run = tmp_path / "run"
    assert main(["train", "--import", "confidence_penalty", *BASE, "--method", "cpen", "--epochs", "1",
                 "--out", str(run)]) == 0
    assert (run / "summary.json").is_file()


def test_sweep_file_import_list(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("out: runs\nimport: [confidence_penalty]\nbase: {data: {name: digits}, model: {name: cnn_small}}\n"
                     "grid: {method.name: [ce, cpen]}\n")
    assert main(["sweep", str(sweep), "--plan"]) == 0
    assert "method.name=cpen" in capsys.readouterr().out
    sweep.write_text("out: runs\nimport: [nope_mod]\nbase: {method: {name: ce}}\n")
    assert main(["sweep", str(sweep), "--plan"]) == 2
    assert "import: nope_mod: module not found" in capsys.readouterr().err


SAT = EXAMPLE.read_text().replace('name = "cpen"', 'name = "sat"').replace("class ConfidencePenalty", "class Sat")


def _selfkd(args, cwd, **kw):
    import subprocess

    script = Path(sys.executable).parent / "selfkd"  # the console script, not python -m
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def test_console_script_imports_from_the_working_directory_and_py_paths(tmp_path):
    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "sat_mod.py").write_text(SAT)
    res = _selfkd(["--import", "sat_mod", "methods", "sat"], cwd=plug)  # as `python -m selfkd` finds it
    assert res.returncode == 0 and "sat: CE(z, y)" in res.stdout, res.stderr
    res = _selfkd(["--import", "./plug/sat_mod.py", "methods", "sat"], cwd=tmp_path)  # a .py path
    assert res.returncode == 0 and "sat: CE(z, y)" in res.stdout, res.stderr
    res = _selfkd(["--import", "./plug/missing.py", "methods"], cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == "" and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("selfkd: error: --import ./plug/missing.py: no such file (")
    res = _selfkd(["--import", "sat_mod", "methods"], cwd=tmp_path)  # not on the path: the hint
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "PYTHONPATH" in res.stderr, res.stderr


def test_imports_recorded_and_reimported_by_resume_and_export(tmp_path, monkeypatch, capsys):
    import yaml

    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "sat_mod.py").write_text(SAT)
    run = tmp_path / "run"
    res = _selfkd(["train", "--import", "sat_mod", *BASE, "--method", "sat", "--epochs", "1", "--out", str(run)],
                  cwd=plug)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["imports"] == ["sat_mod"]
    # elsewhere, with the module's folder on PYTHONPATH and no --import: export and resume import it again
    env = {**__import__("os").environ, "PYTHONPATH": str(plug)}
    res = _selfkd(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")],
                  cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    (run / "summary.json").unlink()  # the last checkpoint is the last epoch: resume finishes the run
    res = _selfkd(["train", "--resume", str(run)], cwd=tmp_path, env=env)
    assert res.returncode == 0 and (run / "summary.json").is_file(), res.stderr
    # a .py path is recorded absolute, so it works from any folder (trained here: a new process is the export's)
    run2 = tmp_path / "run2"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--import", "plug/sat_mod.py", *BASE, "--method", "sat", "--epochs", "1", "--out",
                 str(run2)]) == 0
    del sys.modules["sat_mod"]  # imported by path under its file's name, its folder put first on sys.path
    sys.path.remove(str(plug))
    assert yaml.safe_load((run2 / "config.yaml").read_text())["imports"] == [str(plug / "sat_mod.py")]
    res = _selfkd(["export", str(run2), "--format", "safetensors", "--out", str(tmp_path / "m2.safetensors")],
                  cwd=run2)
    assert res.returncode == 0, res.stderr
    # a recorded module that cannot be imported (here, in this process, where plug/ is not on the path): one
    # line naming it, nothing written
    assert "sat_mod" not in sys.modules
    capsys.readouterr()
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "n.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "imports: the run was trained with sat_mod: module not found" in err, err
    assert not (tmp_path / "n.safetensors").exists()
    (run / "summary.json").unlink()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "sat_mod: module not found" in err and err.count("\n") == 1, err
    assert not (run / "summary.json").exists()


def test_imports_keep_config_hashes_and_sweeps_record_them(tmp_path):
    from selfkd.engine.config import Config, build_config, config_hash
    from selfkd.experiments.sweep import plan

    # the hashes of configs without imports are those of selfkd before imports were recorded
    assert config_hash(Config()) == "751fddbf0c1467677c03fcdcf123ec655c4bf91cfd4462e938dc5aa662f8009a"
    cfg = build_config({"method": {"name": "dlb"}, "train": {"epochs": 3}})
    # DLB's cache_dtype / cache_topk (issue 18) changed this hash; checkpoints written before them still resume:
    # keys added since a checkpoint count as unchanged (config_diff), so only the hash moved
    assert config_hash(cfg) == "c2ef2ec46eda0622a2c8431c2a970b26aa5acaeac8b0511bef9c8633988ae407"
    from selfkd.engine.config import config_diff

    before = cfg.to_dict()
    for key in ("cache_dtype", "cache_topk"):
        before["method"].pop(key)
    assert config_diff(before, cfg.to_dict()) == []
    assert "imports" not in cfg.to_dict()
    with_imports = build_config({"method": {"name": "dlb"}, "train": {"epochs": 3}, "imports": ["x_mod"]})
    assert with_imports.to_dict()["imports"] == ["x_mod"] and config_hash(with_imports) == config_hash(cfg)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("out: runs\nimport: [confidence_penalty]\nbase: {data: {name: digits}, model: {name: cnn_small}}\n"
                     "grid: {method.name: [ce, cpen]}\n")
    assert [r.cfg.imports for r in plan(sweep).runs] == [["confidence_penalty"]] * 2
