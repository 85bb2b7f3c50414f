"""The reference trainer and CLI: run files, bit-identical seeds, kill-and-resume, NaN stops, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from selfkd.cli import main
from selfkd.engine import checkpoint as ckpt
from selfkd.engine import rundir
from selfkd.engine.config import build_config, resolve
from selfkd.data import load_dataset
from selfkd.engine.trainer import TIMING_KEYS, Trainer
from selfkd.engine.setup import build
from selfkd.engine.stages import train_run
from selfkd.errors import ConfigError, TrainingError
from selfkd.methods import CE, register_method

BASE = ["--data", "digits", "--model", "cnn_small", "--seed", "0", "--no-progress"]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def weights(run: Path) -> dict:
    return ckpt.load(run / "checkpoint.pt")["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_writes_run_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *BASE, "--method", "dlb", "--epochs", "2", "--out", str(run)]) == 0
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "best.pt",
                                               "test_correct.npy"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_ce", "train_kd", "test_acc", "test_top5", "test_nll", "test_ece",
                "images_per_s", "peak_mem_mb"):
        assert key in rows[0], key
    assert rows[1]["train_kd"] > 0
    s = json.loads((run / "summary.json").read_text())
    for key in ("last_acc", "best_acc", "best_epoch", "ece", "nll", "epochs", "seconds", "images_per_s"):
        assert key in s, key
    assert s["epochs"] == 2 and s["last_acc"] == rows[-1]["test_acc"] and s["best_acc"] == max(r["test_acc"] for r in rows)
    assert s["forwards_per_sample"] == 2.0
    assert s["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and s["cpu"]  # exact numbers depend on them
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and "cache_logits" in state["method"]
    assert "method:\n  name: dlb\n  temperature: 3.0" in (run / "config.yaml").read_text()
    err = capsys.readouterr().err
    assert "epoch 1/2 | loss" in err and "epoch 2/2 | loss" in err


def test_same_seed_is_bit_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert main(["train", *BASE, "--method", "dlb", "--epochs", "2", "--out", str(run)]) == 0
    assert metrics(a) == metrics(b)
    assert same_weights(weights(a), weights(b))
    c = tmp_path / "c"
    other_seed = ["--data", "digits", "--model", "cnn_small", "--seed", "1", "--no-progress"]
    assert main(["train", *other_seed, "--method", "dlb", "--epochs", "2", "--out", str(c)]) == 0
    assert metrics(c) != metrics(a)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "selfkd", *args]


@pytest.mark.parametrize("method", ["ce", "dlb"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, capsys, method):
    """A process SIGKILLed inside epoch 2, resumed: the uninterrupted run's metrics and weights. Only the
    killed run needs a process of its own; the reference and the resume run here (each new process costs
    seconds of imports), all with one thread."""
    args = [*BASE, "--method", method, "--epochs", "3", "--batch-size", "16", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    threads = torch.get_num_threads()
    ref = tmp_path / "ref"
    try:
        assert main(["train", *args, "--out", str(ref)]) == 0
    finally:
        torch.set_num_threads(threads)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", *args, "--out", str(run)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until epoch 1 is checkpointed, then kill inside epoch 2
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 1:
            break
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 3

    capsys.readouterr()
    try:
        assert main(["train", "--resume", str(run), "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert f"resumed {run} at epoch {done}/3" in capsys.readouterr().err
    assert metrics(run) == metrics(ref)
    assert same_weights(weights(run), weights(ref))
    assert torch.equal(ckpt.load(run / "best.pt")["model"]["fc.weight"], ckpt.load(ref / "best.pt")["model"]["fc.weight"])
    assert (run / "test_correct.npy").read_bytes() == (ref / "test_correct.npy").read_bytes()


def test_train_writes_the_final_per_image_correctness(tmp_path):
    """RUN/test_correct.npy: the final evaluation's top-1 hits, one per test image in test-set order."""
    run = tmp_path / "run"
    assert main(["train", *BASE, "--method", "ce", "--epochs", "2", "--set", "data.subset=200", "--out", str(run)]) == 0
    arr = np.load(run / "test_correct.npy", allow_pickle=False)
    s = json.loads((run / "summary.json").read_text())
    assert arr.dtype == np.bool_ and arr.shape == (s["test_images"],)
    assert 100.0 * int(arr.sum()) / len(arr) == s["last_acc"]  # the summary's own formula, exactly
    assert abs(100 * arr.mean() - s["last_acc"]) < 1e-12
    # the final weights' hits, against the test labels in order (the file is not of an earlier epoch)
    setup = build(resolve(file=str(run / "config.yaml")))
    setup.model.load_state_dict(weights(run))
    setup.model.eval()
    with torch.no_grad():
        pred = setup.model(setup.augment.normalize(setup.test.batch(range(len(setup.test)))[0])).argmax(1)
    assert arr.tolist() == (pred == setup.test.labels).tolist()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    (run / ".test_correct.npy.abcdefgh.tmp").write_bytes(b"x")  # what a kill mid-write leaves: a run file's temp
    assert rundir.remove_leftovers(run) == [".test_correct.npy.abcdefgh.tmp"]


class NaNAt(CE):
    """CE that turns non-finite at a given global step (to test the stop)."""

    name = "test-nan"
    at = 1_000_000

    def loss(self, logits, target, index=None):
        out = super().loss(logits, target, index)
        NaNAt.calls = getattr(NaNAt, "calls", 0) + 1
        if NaNAt.calls == NaNAt.at:
            out.loss = out.loss * float("nan")
        return out


register_method(NaNAt)


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = build_config({"method": {"name": "test-nan"}, "train": {"epochs": 3, "device": "cpu", "log_every": 5},
                        "optim": {"batch_size": 64}})
    run = tmp_path / "run"
    setup = build(cfg)
    steps = -(-len(setup.train) // 64)  # 22 steps per epoch
    NaNAt.calls, NaNAt.at = 0, steps + 3  # epoch 2, step 3
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2 step 3 \(global step 25\)"):
        Trainer(setup, run, progress=False, log=lambda m: None).run()
    state = ckpt.load(run / "checkpoint.pt")
    assert state["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run / "summary.json").exists()


def _run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("args, needle", [
    (["--model", "resnet9"], "unknown model 'resnet9'"),
    (["--method", "dbl"], "unknown method 'dbl'"),
    (["--set", "method.name=dlb", "--set", "method.temperature=0"], "temperature"),
    (["--set", "method.name=dlb", "--set", "method.alpha=-1"], "alpha"),
    (["--batch-size", "1"], "optim.batch_size"),
    (["--set", "optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["--data", "cifar10", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--data", "imagenet"], "imagenet"),
    (["--epochs", "0"], "train.epochs"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    run = tmp_path / "run"
    code, out, err = _run_cli(["train", "--data", "digits", "--out", str(run), "--no-progress", *args], capsys)
    assert code == 2
    assert err.startswith("selfkd: error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err
    assert not run.exists()


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *BASE, "--epochs", "1", "--out", str(run)]) == 0
    before = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}  # tb/ included
    code, _, err = _run_cli(["train", *BASE, "--epochs", "1", "--out", str(run)], capsys)
    assert code == 2 and "already holds a run" in err
    assert {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    code, out, _ = _run_cli(["train", "--resume", str(run)], capsys)
    assert code == 0 and "already finished" in out
    code, _, err = _run_cli(["train", "--resume", str(run), "--epochs", "3"], capsys)
    assert code == 2 and "--resume uses the run's own config.yaml" in err
    code, _, err = _run_cli(["train", "--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not a run directory" in err


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception, match="unknown model"):
        main(["train", "--data", "digits", "--model", "resnet9", "--out", str(tmp_path / "r"), "--debug"])


def test_split_forward_and_options_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *BASE, "--method", "dlb", "--epochs", "1", "--out", str(run),
                 "--set", "method.forward=split", "--set", "method.ce_rows=new",
                 "--set", "data.noise.kind=symmetric", "--set", "data.noise.rate=0.4"]) == 0
    assert json.loads((run / "summary.json").read_text())["method"].startswith("dlb(temperature=3.0")


def test_list_commands(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "dlb: CE(z, y) + α·T²·KL" in out and "temperature = 3.0" in out and "ce: CE(z, y)" in out
    assert main(["models"]) == 0
    assert "resnet32" in capsys.readouterr().out
    assert main(["presets"]) == 0
    assert "dlb-cifar" in capsys.readouterr().out


def test_module_entry_point_and_version():
    res = subprocess.run([sys.executable, "-m", "selfkd", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("selfkd ")


def test_demo_prints_side_by_side_table(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| method | label noise | last acc % | best acc % | ECE | NLL | seconds |" in out
    for row in ("| ce | clean", "| dlb | clean", "| ce | 40% symmetric", "| dlb | 40% symmetric"):
        assert row in out


def test_label_noise_is_recorded_and_memorisation_measured(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *BASE, "--method", "ce", "--epochs", "2", "--out", str(run),
                 "--set", "data.noise.kind=symmetric", "--set", "data.noise.rate=0.4", "--set", "data.noise.seed=5"]) == 0
    noise = json.loads((run / "label_noise.json").read_text())
    assert noise["num_samples"] == 1347 and noise["num_corrupted"] == round(0.4 * 1347) == len(noise["corrupted"])
    assert all(a != b for a, b in zip(noise["noisy_labels"], noise["true_labels"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert 0 <= r["train_corrupted_acc"] + r["train_memorized"] <= 100.0 + 1e-9  # a prediction is one label
    s = json.loads((run / "summary.json").read_text())
    assert s["memorized"] == rows[-1]["train_memorized"] and "corrupted_acc" in s and "clean_acc" in s
    rel = s["reliability"]
    assert sum(rel["count"]) == 450  # the clean test set
    ece = sum(c / 450 * abs(a - f) for c, a, f in zip(rel["count"], rel["acc"], rel["conf"]))
    assert ece == pytest.approx(s["ece"], rel=1e-6)
    clean = tmp_path / "clean"
    assert main(["train", *BASE, "--method", "ce", "--epochs", "1", "--out", str(clean)]) == 0
    assert not (clean / "label_noise.json").exists()
    assert "memorized" not in json.loads((clean / "summary.json").read_text())


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment", "trivialaugment"])
def test_augmentation_policies_are_seeded_and_resume_exactly(tmp_path, policy):
    from selfkd.engine.stages import train_run

    cfg = build_config({"data": {"name": "digits", "subset": 300}, "method": {"name": "dlb"},
                        "augment": {"policy": policy, "cutout": 3},
                        "optim": {"batch_size": 32}, "train": {"epochs": 2, "device": "cpu"}})
    train_run(cfg, tmp_path / "ref", progress=False, log=lambda m: None)

    def stop(msg):
        if msg.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "run", progress=False, log=stop)
    train_run(cfg, tmp_path / "run", resume=True, progress=False, log=lambda m: None)
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")
    plain = build_config({"data": {"name": "digits", "subset": 300}, "method": {"name": "dlb"},
                          "optim": {"batch_size": 32}, "train": {"epochs": 2, "device": "cpu"}})
    train_run(plain, tmp_path / "plain", progress=False, log=lambda m: None)
    assert metrics(tmp_path / "plain") != metrics(tmp_path / "ref")  # the policy really changed the inputs


def _image_tree(root: Path, corrupt: bool = False) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "cat" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


def _malicious_cifar(root: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(root / "pwned"),))

    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (d / name).write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))


@pytest.mark.parametrize("case, needle", [
    ("corrupt", "bad.jpg"),
    ("empty", "train"),
    ("pickle", "refused to unpickle"),
])
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, capsys, case, needle):
    data = tmp_path / "data"
    data.mkdir()
    if case == "corrupt":
        _image_tree(data, corrupt=True)
        args = ["--data", "imagefolder", "--data-dir", str(data), "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    elif case == "empty":
        args = ["--data", "imagefolder", "--data-dir", str(data), "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    else:
        _malicious_cifar(data)
        args = ["--data", "cifar10", "--data-dir", str(data)]
    run = tmp_path / "run"
    code, _, err = _run_cli(["train", *args, "--model", "resnet8", "--out", str(run), "--no-progress"], capsys)
    assert code == 2 and err.startswith("selfkd: error: ") and err.count("\n") == 1 and needle in err, err
    assert not run.exists()
    assert not (data / "pwned").exists()


def test_train_and_test_subsets_are_fixed_stratified_and_recorded(tmp_path):
    cfg = build_config({"data": {"name": "digits", "subset": 200, "test_subset": 100}, "model": {"name": "cnn_small"},
                        "train": {"epochs": 1, "device": "cpu"}})
    s = build(cfg)
    assert (len(s.train), len(s.test)) == (200, 100)
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [10] * 10
    full = load_dataset("digits").test
    again = build(cfg)
    assert torch.equal(again.test.images, s.test.images)  # fixed by data.subset_seed, not train.seed
    # every kept test image is a real test image with its own label
    for img, lab in zip(s.test.images[:20], s.test.labels[:20]):
        hit = (full.images == img).flatten(1).all(1) & (full.labels == lab)
        assert hit.any()
    summary = train_run(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert (summary["train_images"], summary["test_images"]) == (200, 100)
    assert summary["threads"] == torch.get_num_threads()
    with pytest.raises(ConfigError, match=r"data.test_subset=451 exceeds the 450 test images"):
        build(build_config({"data": {"name": "digits", "test_subset": 451}}))


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_peak_memory_is_the_runs_own_not_the_process_lifetime_peak(tmp_path):
    big = torch.ones(100_000_000)  # 400 MB resident, then freed: the process's lifetime peak
    del big
    hwm = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    cfg = build_config({"data": {"name": "digits", "subset": 100}, "model": {"name": "cnn_small"},
                        "train": {"epochs": 1, "device": "cpu"}})
    summary = train_run(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert 0 < summary["peak_mem_mb"] < hwm - 300


def test_eval_every_scores_every_kth_epoch_and_the_last(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *BASE, "--method", "ce", "--epochs", "5", "--set", "train.eval_every=2",
                 "--set", "data.noise.kind=symmetric", "--set", "data.noise.rate=0.4", "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r["epoch"] for r in rows if "test_acc" in r]
    assert scored == [2, 4, 5]  # every 2nd epoch, and the last always
    assert [r["epoch"] for r in rows if "train_memorized" in r] == scored
    assert all("train_acc" in r and "train_loss" in r for r in rows)
    s = json.loads((run / "summary.json").read_text())
    best = max((r for r in rows if "test_acc" in r), key=lambda r: r["test_acc"])
    assert s["best_epoch"] == best["epoch"] and s["last_acc"] == rows[-1]["test_acc"]
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] in scored


def test_evidence_score_reads_and_checks_the_file_train_wrote(tmp_path):
    """benchmarks/evidence.py's score(): the file `selfkd train` wrote is the re-scoring of checkpoint.pt."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import evidence

    run = tmp_path / "run"
    assert main(["train", *BASE, "--method", "ce", "--epochs", "1", "--set", "data.subset=200", "--threads", "1",
                 "--out", str(run)]) == 0
    written = np.load(run / "test_correct.npy", allow_pickle=False)
    assert evidence.score(run).tolist() == written.tolist()
    (run / "test_correct.npy").unlink()  # as a run made before train wrote it: re-scored and cached
    threads = torch.get_num_threads()
    try:
        assert evidence.score(run).tolist() == written.tolist()
    finally:
        torch.set_num_threads(threads)  # score() sets one thread for its process
    assert np.load(run / "test_correct.npy", allow_pickle=False).tolist() == written.tolist()
    flipped = written.copy()
    flipped[0] = not flipped[0]
    np.save(run / "test_correct.npy", flipped)  # a file that does not describe the run: refused
    with pytest.raises(SystemExit, match="not the per-image correctness of summary.json's last_acc"):
        evidence.score(run)
