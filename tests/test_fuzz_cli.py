"""Property: whatever `--set` items and YAML config a user throws at `selfkd train`, the outcome is a
finished run, or exit 2 with one line and nothing written (a non-finite loss during training, which no
check can foresee, is the one allowed stop after writing: it keeps the last good checkpoint).

Tiny budget for every example: digits, cnn_small, one epoch on 60 training and 30 test images; the
budget keys are forced last so no example runs long."""
import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from selfkd.cli import main
from selfkd.engine.config import Config, flatten
from selfkd.methods import available_methods

BUDGET = ["data.name=digits", "model.name=cnn_small", "train.epochs=1", "data.subset=60", "data.test_subset=30",
          "train.device=cpu", "train.compile=false", "data.num_workers=0", "data.image_size=null"]
KEYS = sorted(flatten(Config().to_dict())) + ["method.name", "method.temperature", "method.alpha", "method.label_smoothing",
                                              "data", "optim", "method", "train.nope", "optim.lr.deeper", "augment.cutout"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-2, max_value=2),
    st.sampled_from(["none", "cosine", "multistep", "symmetric", "pairflip", "randaugment", "mixup", "cutmix", "bf16",
                     "on", "auto", *available_methods(), "resnet8", "vgg16", "cifar10", "imagefolder", ""]),
    st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=5)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=15))


def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


set_items = st.one_of(
    st.builds(lambda k, v: f"{k}={_yaml_value(v)}", keys, values),
    st.text(max_size=20),  # anything at all: no '=', bad YAML, empty key parts
)
configs = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["data", "augment", "model", "method", "optim", "schedule", "train", "extra"]),
                    st.dictionaries(st.sampled_from([k.split(".", 1)[-1].split(".")[0] for k in KEYS] + ["bogus"]),
                                    values, max_size=3) | values, max_size=3).map(lambda d: yaml.safe_dump(d)),
    st.text(max_size=60),  # arbitrary text: bad YAML, a list, a scalar
    st.sampled_from(["optim: {lr: 0.1}\noptim: {lr: 0.2}\n", "train:\n  epochs: 1\n  epochs: 2\n", "- a\n- b\n",
                     "!!python/object/apply:os.system ['echo pwned']\n"]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(items=st.lists(set_items, max_size=4), config=configs)
@example(items=["method.name=dlb", "method.temperature=4"], config="optim: {lr: 0.1}\n")  # a valid run is checked too
def test_any_set_and_yaml_gives_a_run_or_one_line(items, config):
    root = Path(tempfile.mkdtemp(prefix="selfkd-fuzz-"))
    try:
        out = root / "run"
        argv = ["train", "--out", str(out), "--no-progress"]
        if config is not None:
            (root / "c.yaml").write_text(config)
            argv += ["--config", str(root / "c.yaml")]
        for item in [*items, *BUDGET]:
            argv += ["--set", item]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit:  # argparse's own errors (e.g. `--set -x`: a value that looks like a flag)
                code = exit.code
        text = err.getvalue()
        assert "Traceback" not in text, text
        if code == 0:
            assert (out / "summary.json").is_file(), text
            return
        assert code == 2, (code, text)
        lines = text.splitlines()
        if lines and "non-finite loss" in lines[-1]:  # found only by training: the last good state is kept
            assert lines[-1].startswith("selfkd: error: ")
            return
        assert len(lines) == 1 and lines[0].startswith("selfkd: error: "), (argv, text)
        assert not out.exists(), (argv, text)
        assert not (root / "pwned").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# `selfkd finetune`: its options and `--set` on finetune configs, on the tiny BERT of tests/tinylm.py
def _finetune_keys() -> list[str]:
    from selfkd.integrations.finetune_config import FinetuneConfig

    return sorted(flatten(FinetuneConfig.model_validate({"data": {"path": "x"}, "model": {"path": "y"}}).to_dict()))


FT_BUDGET = ["train.epochs=1", "data.max_length=16", "data.subset=null", "data.test_subset=null", "train.device=cpu",
             "train.save_model=false", "train.bf16=off"]
ft_keys = st.one_of(st.sampled_from(_finetune_keys() + ["method.temperature", "method.schedule", "model.lora.r",
                                                        "model.lora.target_modules", "data.nope", "optim"]),
                    st.text(max_size=12))
ft_items = st.one_of(st.builds(lambda k, v: f"{k}={_yaml_value(v)}", ft_keys, values), st.text(max_size=16))
ft_options = st.fixed_dictionaries({}, optional={
    "--epochs": st.integers(min_value=-2, max_value=1).map(str),
    "--seed": st.one_of(st.integers(min_value=-5, max_value=2**70).map(str), st.text(max_size=4)),
    "--batch-size": st.one_of(st.integers(min_value=-2, max_value=40).map(str), st.sampled_from(["x", "1.5", ""])),
    "--lr": st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str), st.sampled_from(["-1", "x", "0"])),
    "--method": st.sampled_from(["ce", "dlb", "ls", "pskd", "cskd", "byot", "nope", ""]),
    "--device": st.sampled_from(["cpu", "auto", "gpu"]),
    "--threads": st.sampled_from(["0", "-1", "1", "x"]),
})


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    pytest.importorskip("transformers")
    import tinylm

    root = tmp_path_factory.mktemp("fuzz-lm")
    return tinylm.make_model(root / "model"), tinylm.make_corpus(root / "corpus", per_class=4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(options=ft_options, items=st.lists(ft_items, max_size=3), config=configs)
@example(options={"--method": "dlb", "--batch-size": "4"}, items=["method.schedule=entropy"], config=None)
def test_any_finetune_option_and_set_gives_a_run_or_one_line(lm, options, items, config):
    model, corpus = lm
    root = Path(tempfile.mkdtemp(prefix="selfkd-fuzz-ft-"))
    try:
        out = root / "run"
        argv = ["finetune", "--data", str(corpus), "--model", str(model), "--out", str(out)]
        for flag, value in options.items():
            argv += [f"{flag}={value}"]
        if config is not None:
            (root / "c.yaml").write_text(config)
            argv += ["--config", str(root / "c.yaml")]
        for item in [*items, *FT_BUDGET]:
            argv += ["--set", item]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit:  # argparse's own errors
                code = exit.code
        text = err.getvalue()
        assert "Traceback" not in text, (argv, text)
        if code == 0:
            assert (out / "summary.json").is_file(), text
            return
        assert code == 2, (code, argv, text)
        lines = text.splitlines()
        assert lines and lines[-1].startswith("selfkd: error: "), (argv, text)
        if not (out / "config.yaml").exists():  # refused before the run: one line, nothing written
            assert len(lines) == 1 and not out.exists(), (argv, text)
        assert not (root / "pwned").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
