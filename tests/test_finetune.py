"""selfkd finetune: a real transformers Trainer on a tiny random BERT folder and a corpus the test writes."""
import json
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from selfkd.cli import main  # noqa: E402
from selfkd.integrations.finetune_config import resolve_finetune  # noqa: E402
from selfkd.experiments.report import build_report  # noqa: E402

import tinylm  # noqa: E402
from handmath import hand_kl  # noqa: E402


def interrupt_in_epoch_2(monkeypatch):
    """A Ctrl-C at the start of the second epoch of the next finetune run in this process; returns the undo."""
    from selfkd.integrations import finetune

    begin = finetune._Epochs.on_epoch_begin

    def stop_in_epoch_2(self, args, state, control, **kw):
        if state.epoch >= 1:
            raise KeyboardInterrupt
        return begin(self, args, state, control, **kw)

    monkeypatch.setattr(finetune._Epochs, "on_epoch_begin", stop_in_epoch_2)
    return lambda: monkeypatch.setattr(finetune._Epochs, "on_epoch_begin", begin)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    torch.set_num_threads(1)
    return {"model": tinylm.make_model(root / "model"), "data": tinylm.make_corpus(root / "corpus", long_every=4),
            "notok": tinylm.make_model(root / "notok", tokenizer=False)}


def cli(parts, out, *extra, method="dlb", epochs=2):
    return main(["finetune", "--data", str(parts["data"]), "--model", str(parts["model"]), "--method", method,
                 "--epochs", str(epochs), "--batch-size", "4", "--lr", "2e-3", "--out", str(out),
                 "--set", "data.max_length=24", "--set", "train.log_every=50", *extra])


def test_dlb_run_directory_summary_and_report(parts, tmp_path, capsys):
    assert cli(parts, tmp_path / "runs" / "dlb", "--set", "method.schedule=confidence") == 0
    run = tmp_path / "runs" / "dlb"
    assert {p.name for p in run.iterdir()} - {".lock"} == {"config.yaml", "data.json", "metrics.jsonl", "metrics.csv",
                                                         "tb", "summary.json", "model",
                                                         "test_correct.npy"}  # train.log=auto, tensorboard installed
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    s = json.loads((run / "summary.json").read_text())
    for key in ("last_acc", "best_acc", "macro_f1", "ece", "nll", "seconds", "reliability"):
        assert key in s
    assert s["last_acc"] == rows[-1]["test_acc"] and s["macro_f1"] == rows[-1]["test_macro_f1"]
    assert s["forwards_per_sample"] == 2.0 and s["train_docs"] == 18 and s["test_docs"] == 6
    assert s["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and s["cpu"]  # as selfkd train's summary
    hits = np.load(run / "test_correct.npy", allow_pickle=False)  # the final evaluation's, one per test document
    assert hits.dtype == np.bool_ and hits.shape == (6,) and 100.0 * int(hits.sum()) / 6 == s["last_acc"]
    data = json.loads((run / "data.json").read_text())
    assert data["train"] == {"food": 6, "sport": 6, "tech": 6} and data["max_length"] == 24
    err = capsys.readouterr().err
    assert err.count("longer than 24 tokens") == 1  # truncation is said once
    assert s["truncated_train"] + s["truncated_test"] == 6  # every 4th of 8 documents per class is long
    assert cli(parts, tmp_path / "runs" / "ce", method="ce", epochs=1) == 0
    build_report([str(tmp_path / "runs")])
    md = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert "macro-F1 %" in md and "| `dlb` |" in md and "| `ce` |" in md


def weights(run):
    name = "adapter_model.safetensors" if (run / "model" / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(run / "model" / name))


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_resume_is_exact(parts, tmp_path, monkeypatch, lora):
    """Stopped after epoch 1's checkpoint (dropout on: the RNG state counts), resumed: the same weights as one run
    (with LoRA: the same adapters and head)."""
    if lora:
        pytest.importorskip("peft")
    extra = ("--set", "method.schedule=entropy", "--set", "train.seed=3", "--set", f"model.lora.r={lora}")
    assert cli(parts, tmp_path / "whole", *extra, epochs=2) == 0
    resume_normally = interrupt_in_epoch_2(monkeypatch)
    assert cli(parts, tmp_path / "cut", *extra, epochs=2) == 130
    assert not (tmp_path / "cut" / "summary.json").exists()
    resume_normally()
    assert main(["finetune", "--resume", str(tmp_path / "cut")]) == 0
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_" in k for k in a) == bool(lora)

    def metrics(run):
        drop = ("train_seconds", "epoch_seconds")
        return [{k: v for k, v in json.loads(line).items() if k not in drop}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert metrics(tmp_path / "whole") == metrics(tmp_path / "cut")
    assert main(["finetune", "--resume", str(tmp_path / "cut")]) == 0  # finished: nothing to do


@pytest.mark.parametrize("case,match", [
    ("notok", r"model.path .*notok: no tokenizer there"),
    ("unknown", r"unknown key 'optim.momentum'"),
    ("method", r"method.name: 'cskd' runs forward passes of its own"),
    ("long", r"data.max_length=500 exceeds the model's limit of 64 tokens"),
    ("dynamic", r"schedule 'dynamic' was renamed 'confidence'"),
    ("lora", r"model.lora.target_modules \['nope'\]"),
])
def test_bad_input_one_line_nothing_written(parts, tmp_path, capsys, case, match):
    p = dict(parts)
    extra = {"unknown": ["--set", "optim.momentum=0.9"], "long": ["--set", "data.max_length=500"],
             "dynamic": ["--set", "method.schedule=dynamic"],
             "lora": ["--set", "model.lora.r=2", "--set", "model.lora.target_modules=[nope]"]}.get(case, [])
    if case == "notok":
        p["model"] = parts["notok"]
    out = tmp_path / "run"
    assert cli(p, out, *extra, method="cskd" if case == "method" else "dlb", epochs=1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("selfkd: error: ") and re.search(match, err[-1]), err
    assert not out.exists()


def test_out_holding_a_run_is_refused(parts, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("kind: finetune\n")
    assert cli(parts, tmp_path / "run", epochs=1) == 2
    assert "already holds a run" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert cli(parts, tmp_path / "other", epochs=1) == 2
    assert "folder is not empty (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "a finetune run; resume it with selfkd finetune --resume" in capsys.readouterr().err
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "config.yaml").write_text("data: {name: digits}\n")
    assert main(["finetune", "--resume", str(tmp_path / "img")]) == 2
    assert "a train run; resume it with selfkd train --resume" in capsys.readouterr().err


def test_lora_trains_adapters_only_and_dlb_caches_the_adapted_logits(parts, tmp_path):
    pytest.importorskip("peft")
    from selfkd.integrations.finetune import _Run, build_finetune

    cfg = resolve_finetune(flags={"data": {"path": str(parts["data"]), "max_length": 24},
                                  "model": {"path": str(parts["model"]), "lora": {"r": 4, "alpha": 8}},
                                  "method": {"name": "dlb", "temperature": 2.0},
                                  "optim": {"batch_size": 4, "lr": 1e-2}, "train": {"epochs": 1, "save_model": False}})
    s = build_finetune(cfg, log=lambda m: None)
    base = {k: v.detach().clone() for k, v in s.model.named_parameters() if "lora_" not in k and "classifier" not in k}
    trainable = {k for k, v in s.model.named_parameters() if v.requires_grad}
    assert trainable and all("lora_" in k or "classifier" in k for k in trainable)
    calls = []
    inner = s.method.loss

    def record(logits, target, index=None, **kw):
        cache = s.method.cached_logits
        cache = None if cache is None else cache.clone()
        out = inner(logits, target, index=index, **kw)
        calls.append((logits.detach().clone(), out.parts["kd"].item(), cache))
        return out

    s.method.loss = record
    _Run(s, tmp_path / "lora", log=lambda m: None).run(resume=False)
    assert len(calls) == 5  # 18 documents, 4 new per step
    for k, v in s.model.named_parameters():
        if k in base:
            assert torch.equal(v, base[k]), k  # the encoder is frozen
    moved = [k for k, v in s.model.named_parameters() if "lora_B" in k and v.abs().sum() > 0]
    assert moved  # lora_B starts at zero: the adapters were trained
    for (prev, _, _), (cur, kd, cache) in zip(calls, calls[1:]):  # the teacher: the adapted model's previous output
        teacher, student = prev[-4:], cur[:4]  # 4 new documents per step before the last
        assert torch.equal(cache, teacher.float())
        hand = sum(hand_kl(t.tolist(), st.tolist(), 2.0) for t, st in zip(teacher, student)) / 4 * 4
        assert kd == pytest.approx(hand, rel=1e-3, abs=2e-7)  # float32 KL of two close distributions
    state = s.method.state_dict()
    assert torch.equal(state["cache_logits"], calls[-1][0][-2:].float())
    assert calls[0][2] is None and len(calls[-1][0]) == 6  # first step: nothing cached; last: 4 repeated + 2 new  # last step: 2 new documents


@pytest.mark.parametrize("case,match", [
    ("truncated", r"config.json: not valid JSON: unterminated string starting at line 1 column \d+$"),
    ("empty", r"config.json: empty file"),
    ("list", r"config.json: holds a JSON list, expected an object"),
    ("no_type", r"config.json: no 'model_type' key"),
    ("unknown_type", r"config.json: model_type 'nopebert' is not an architecture transformers [0-9.]+ knows"),
    ("bad_value", r"config.json: rejected by transformers \(\w+: .*hidden_size.* expected int, got str"),
])
def test_broken_model_config_says_what_is_wrong(parts, tmp_path, capsys, case, match):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(parts["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    text = {"truncated": json.dumps(cfg)[:40], "empty": "", "list": "[1, 2]",
            "no_type": json.dumps({k: v for k, v in cfg.items() if k != "model_type"}),
            "unknown_type": json.dumps({**cfg, "model_type": "nopebert"}),
            "bad_value": json.dumps({**cfg, "hidden_size": "big"})}[case]
    (model / "config.json").write_text(text)
    out = tmp_path / "run"
    assert cli({**parts, "model": model}, out, epochs=1) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"selfkd: error: model.path {model}"), err
    assert re.search(match, err), err
    assert not out.exists()


KILL_ARGS = ["--method", "dlb", "--epochs", "2", "--batch-size", "4", "--lr", "2e-3", "--set", "data.max_length=24",
             "--set", "train.log_every=50", "--set", "train.seed=3", "--threads", "1"]


def kill_run_args(parts) -> list[str]:
    """The kill tests' run, as `selfkd finetune` options (less --out)."""
    return ["--data", str(parts["data"]), "--model", str(parts["model"]), *KILL_ARGS]


def finetune_process(parts, *args, kill_at=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("SELFKD_KILL_AT", None)
    plugin = []
    if kill_at:
        env["SELFKD_KILL_AT"] = kill_at
        plugin = ["--import", "killsave"]  # tests/killsave.py: SIGKILL at that point of a save
    if args[0] != "--resume":
        args = (*kill_run_args(parts), *args)
    return subprocess.run([sys.executable, "-m", "selfkd", *plugin, "finetune", *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(parts, tmp_path_factory):
    """The reference run, in this process (the resumes below run here too and must match the killed processes)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["finetune", *kill_run_args(parts), "--out", str(run)]) == 0
    return run


def _metrics(run):
    drop = ("train_seconds", "epoch_seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


# (kill point, where the resume starts, whether a folder is removed). 18 documents, batch 4: epoch 1 ends at
# step 5, epoch 2 at step 10; each epoch's end saves hf/checkpoint-STEP, then the final model/ is written.
@pytest.mark.parametrize("kill_at,resumed,removed", [
    ("weights:1", "no complete checkpoint yet; starting again at epoch 0/2", "hf/.selfkd-saving"),
    ("trainer_state:2/legacy", "at epoch 1/2", "hf/checkpoint-10"),
    ("method:2", "at epoch 1/2", "hf/.selfkd-saving"),
    ("rotate:2", "at epoch 2/2", None),
    ("weights:3", "at epoch 2/2", None),
], ids=["first-save-weights-half-written", "old-layout-no-method-state", "before-rename", "before-rotation",
        "final-model-half-written"])
def test_killed_while_saving_resumes_bit_identical(parts, uninterrupted, tmp_path, capsys, kill_at, resumed, removed):
    """SIGKILL at points inside a checkpoint save (tests/killsave.py), then --resume: the same weights and
    metrics as the uninterrupted run. ``/legacy``: the killed save's folder is moved to its final name, as
    selfkd wrote checkpoints before they were staged (a folder without the method state). The killed run is
    a process of its own; the resume reads only its files, so it runs in this process (a new one costs the
    ~7 s of importing transformers)."""
    point, _, legacy = kill_at.partition("/")
    run = tmp_path / "run"
    res = finetune_process(parts, "--out", str(run), kill_at=point)
    assert res.returncode == -9, (res.returncode, res.stderr)  # killed, not finished
    assert not (run / "summary.json").exists()
    stage = run / "hf" / ".selfkd-saving"
    if legacy:
        (stage / "checkpoint-10").rename(run / "hf" / "checkpoint-10")
        assert not (run / "hf" / "checkpoint-10" / "selfkd_method.pt").exists()
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"resumed {run}" in err and resumed in err, err
    if removed:
        assert f"removed {removed}: a checkpoint the run was stopped while saving" in err, err
    else:
        assert "removed" not in err
    a, b = weights(uninterrupted), weights(run)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(run) == _metrics(uninterrupted)
    assert {p.name for p in run.iterdir()} - {".lock"} == {"config.yaml", "data.json", "metrics.jsonl", "metrics.csv",
                                                           "tb", "summary.json", "model", "test_correct.npy"}
    assert (run / "test_correct.npy").read_bytes() == (uninterrupted / "test_correct.npy").read_bytes()


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_malicious_trainer_file_in_a_checkpoint_is_one_line(parts, tmp_path, monkeypatch, capsys, name):
    """The Trainer refuses it (weights_only); the refusal names the file in one line, not a traceback."""
    resume_normally = interrupt_in_epoch_2(monkeypatch)
    assert cli(parts, tmp_path / "cut", epochs=2) == 130
    resume_normally()
    (folder,) = (tmp_path / "cut" / "hf").glob("checkpoint-*")
    torch.save({"x": _Payload()}, folder / name)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err
    assert re.match(f"selfkd: error: resume_from_checkpoint: checkpoint {re.escape(str(folder / name))}: "
                    "(refused to load global|not a readable checkpoint \\(UnpicklingError)", err.splitlines()[-1]), err
    assert "Traceback" not in err and "pwned" not in err
