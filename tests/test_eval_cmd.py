"""`selfkd eval RUN --data ... --out FILE`: a train or finetune run scored on a data set with the run's own
preprocessing (resize, normalisation, tokenizer), the metrics as summary.json has them, bad input one line."""
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import selfkd
from selfkd.cli import main
from selfkd.data import load_dataset
from selfkd.engine import checkpoint as ckpt
from selfkd.engine.metrics import ece, nll, reliability
from test_data import make_tree
from test_safety import one_line_error, run_cli

DIGITS = ["--data", "digits", "--model", "cnn_small", "--seed", "0", "--no-progress", "--set", "data.subset=200",
          "--batch-size", "50", "--set", "train.log=csv"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ev") / "digits"
    assert main(["train", *DIGITS, "--epochs", "2", "--out", str(run)]) == 0
    return run


def scored(capsys, *args):
    code, out, err = run_cli(capsys, "eval", *args)
    assert code == 0, err
    return out


def hand_logits(run, images, weights="best.pt"):
    """The model of ``weights`` on uint8 images normalised by hand with the run's recorded mean and std."""
    info = json.loads((run / "data.json").read_text())
    model = selfkd.build_model("cnn_small", info["num_classes"], info["in_channels"])
    model.load_state_dict(ckpt.load(run / weights)["model"])
    model.eval()
    mean, std = (torch.tensor(info[k], dtype=torch.float32)[:, None, None] for k in ("mean", "std"))
    with torch.no_grad():
        return model((images.float() / 255 - mean) / std)


def test_a_run_on_its_own_data_reproduces_summary(digits_run, tmp_path, capsys):
    out = tmp_path / "e.json"
    line = scored(capsys, digits_run, "--data", "digits", "--out", out)
    r = json.loads(out.read_text())
    s = json.loads((digits_run / "summary.json").read_text())
    # the final weights (the default) on the full test part are what the run measured at its last epoch
    assert (r["acc"], r["top5"], r["ece"], r["nll"]) == (s["last_acc"], s["last_top5"], s["ece"], s["nll"])
    assert r["reliability"] == s["reliability"] and r["count"] == 450 == s["test_images"]
    assert (r["kind"], r["weights"], r["epoch"], r["split"], r["data"]) == ("train", "last", 2, "test", "digits")
    assert r["classes"] == [str(i) for i in range(10)]
    assert line.startswith(f"{out}: acc {s['last_acc']:.2f} | top5 ") and "450 samples" in line


def test_best_weights_and_every_split_by_hand(digits_run, tmp_path, capsys):
    out = tmp_path / "all.json"
    scored(capsys, digits_run, "--data", "digits", "--split", "all", "--weights", "best", "--out", out)
    r = json.loads(out.read_text())
    b = load_dataset("digits")
    x, y = torch.cat([b.train.images, b.test.images]), torch.cat([b.train.labels, b.test.labels])
    z = hand_logits(digits_run, x)
    assert r["count"] == 1797 and r["weights"] == "best" and r["epoch"] == ckpt.load(digits_run / "best.pt")["epoch"]
    assert r["acc"] == pytest.approx(100.0 * float((z.argmax(1) == y).double().mean()), abs=1e-12)
    top5 = 100.0 * float((z.topk(5, dim=1).indices == y[:, None]).any(1).double().mean())
    assert r["top5"] == pytest.approx(top5, abs=1e-12)
    assert r["nll"] == pytest.approx(nll(z, y), rel=1e-6) and r["ece"] == pytest.approx(ece(z, y), abs=1e-6)
    assert r["reliability"]["count"] == reliability(z, y)["count"]


def _image_run(root, tmp_path, counts=None, size=(8, 8), seed=0, **kw):
    """An imagefolder run (3 classes of random RGB images) trained for one epoch."""
    data = tmp_path / f"img{seed}"
    make_tree(data, counts or {"apple": 6, "mango": 6, "zebra": 6}, size=size, seed=seed)
    run = root / f"run{seed}"
    assert main(["train", "--data", "imagefolder", "--data-dir", str(data), "--model", "cnn_small", "--epochs", "1",
                 "--batch-size", "6", "--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                 "--set", "train.log=csv", "--out", str(run)]) == 0
    return run


def test_another_data_set_gets_the_run_s_resize_and_normalisation(tmp_path, capsys):
    run = _image_run(tmp_path, tmp_path)
    other = tmp_path / "other"  # the same classes, 16 x 16 images of brighter statistics
    made = make_tree(other, {"apple": 3, "mango": 2, "zebra": 4}, size=(16, 16), seed=7)
    for rel, arr in made.items():  # brighter: their own mean is far from the run's
        from PIL import Image

        Image.fromarray((arr // 2 + 128).astype(np.uint8)).save(other / rel)
    out = tmp_path / "o.json"
    line = scored(capsys, run, "--data", "imagefolder", "--data-dir", other, "--out", out)
    r = json.loads(out.read_text())
    b = load_dataset("imagefolder", root=other, image_size=8, cache_dir=tmp_path / "cache2")  # the run's 8 px
    z = hand_logits(run, b.test.images, "checkpoint.pt")
    assert r["count"] == 9 and "top5" not in r and "top5" not in line  # 3 classes: top-5 is meaningless
    assert r["acc"] == pytest.approx(100.0 * float((z.argmax(1) == b.test.labels).double().mean()), abs=1e-12)
    assert r["nll"] == pytest.approx(nll(z, b.test.labels), rel=1e-6)
    assert r["ece"] == pytest.approx(ece(z, b.test.labels), abs=1e-6)
    # the data's own statistics would have given other logits: the run's were used
    mean, std = (torch.tensor(v)[:, None, None] for v in (b.mean, b.std))
    info = json.loads((run / "data.json").read_text())
    assert abs(b.mean[0] - info["mean"][0]) > 0.2
    model = selfkd.build_model("cnn_small", 3, 3)
    model.load_state_dict(ckpt.load(run / "checkpoint.pt")["model"])
    with torch.no_grad():
        own = model.eval()((b.test.images.float() / 255 - mean) / std)
    assert nll(own, b.test.labels) != pytest.approx(r["nll"], rel=1e-3)


def test_bad_input_is_one_line_and_writes_nothing(digits_run, tmp_path, capsys):
    img = _image_run(tmp_path, tmp_path)
    two = tmp_path / "two"
    make_tree(two, {"apple": 2, "mango": 2})
    renamed = tmp_path / "renamed"
    make_tree(renamed, {"apple": 2, "mango": 2, "zulu": 2})
    empty = tmp_path / "noweights"  # a run directory with its config but no weights yet
    empty.mkdir()
    for f in ("config.yaml", "data.json"):
        shutil.copy(digits_run / f, empty / f)
    plugin = tmp_path / "plugin"
    shutil.copytree(digits_run, plugin)
    (plugin / "config.yaml").write_text((plugin / "config.yaml").read_text() + "imports: [no_such_plugin_mod]\n")
    kept = tmp_path / "kept.json"
    kept.write_text("mine")
    capsys.readouterr()  # the image run's log
    cases = {
        "no weights": ([empty, "--data", "digits"], [f"eval {empty}: no weights (checkpoint.pt is missing"]),
        "no best": ([empty, "--data", "digits", "--weights", "best"], ["no weights (best.pt is missing"]),
        "class count": ([img, "--data", "imagefolder", "--data-dir", two],
                        ["2 classes, the run has 3 ([apple, mango] vs the run's [apple, mango, zebra])"]),
        "class names": ([img, "--data", "imagefolder", "--data-dir", renamed],
                        ["its class names are not the run's: [zulu] not in the run, [zebra] of the run not in the data"]),
        "channels": ([digits_run, "--data", "imagefolder", "--data-dir", renamed],
                     ["3-channel images; the run's model takes 1"]),
        "unknown data": ([digits_run, "--data", "mnist"], ["eval --data mnist: unknown data set", "digits, cifar10"]),
        "no run": ([tmp_path / "nope", "--data", "digits"], [f"eval {tmp_path / 'nope'}: no such folder"]),
        "not a run": ([tmp_path / "two", "--data", "digits"], ["not a run directory"]),
        "plugin": ([plugin, "--data", "digits"], ["imports: the run was trained with no_such_plugin_mod: module not found"]),
        "no effect": ([digits_run, "--data", "digits", "--data-dir", two], ["--data-dir has no effect with --data digits"]),
        "batch": ([digits_run, "--data", "digits", "--batch-size", "0"], ["--batch-size 0: expected a positive"]),
    }
    for name, (args, needles) in cases.items():
        out = tmp_path / f"{name}.json"
        code, _, err = run_cli(capsys, "eval", *args, "--out", out)
        one_line_error(code, err, *needles)
        assert not out.exists(), name
    # --out: export's rules (never overwritten, its folder must exist)
    code, _, err = run_cli(capsys, "eval", digits_run, "--data", "digits", "--out", kept)
    one_line_error(code, err, f"eval --out {kept}: already exists")
    assert kept.read_text() == "mine"
    code, _, err = run_cli(capsys, "eval", digits_run, "--data", "digits", "--out", tmp_path / "no" / "e.json")
    one_line_error(code, err, f"folder {tmp_path / 'no'} does not exist")
    with pytest.raises(SystemExit) as stop:  # argparse's own check: one line, exit 2
        main(["eval", str(digits_run), "--data", "digits", "--split", "val", "--out", str(tmp_path / "v")])
    assert stop.value.code == 2
    one_line_error(2, capsys.readouterr().err, "invalid choice: 'val'")


def test_recorded_plugin_is_imported_again_in_a_new_process(tmp_path):
    from test_plugins import SAT

    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "sat_mod.py").write_text(SAT)
    run = tmp_path / "run"
    script = [sys.executable, "-m", "selfkd"]
    res = subprocess.run([*script, "--import", "plug/sat_mod.py", "train", *DIGITS, "--method", "sat", "--epochs", "1",
                          "--out", str(run)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([*script, "eval", str(run), "--data", "digits", "--out", "e.json"], cwd=run, capture_output=True,
                         text=True, timeout=300)  # elsewhere, no --import: the recorded .py path is imported
    assert res.returncode == 0, res.stderr
    assert json.loads((run / "e.json").read_text())["acc"] == json.loads((run / "summary.json").read_text())["last_acc"]


def test_help_lists_eval_and_stays_light():
    code = ("import sys; from selfkd.cli import main\n"
            "try:\n    main(['eval', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported at --help'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--split {test,train,all}" in res.stdout and "--out FILE" in res.stdout


# -- finetune runs ------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")

import tinylm  # noqa: E402
from test_finetune import parts  # noqa: E402,F401


@pytest.fixture(scope="module")
def ft_run(parts, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("ftev") / "ft"
    assert main(["finetune", "--data", str(parts["data"]), "--model", str(parts["model"]), "--method", "ce",
                 "--epochs", "1", "--batch-size", "4", "--lr", "2e-3", "--set", "data.max_length=24",
                 "--set", "train.log=csv", "--out", str(run)]) == 0
    return run


def test_finetune_run_on_its_own_corpus_reproduces_summary(parts, ft_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ft.json"
    code, line, err = run_cli(capsys, "eval", ft_run, "--data", parts["data"], "--out", out)
    assert code == 0 and err == "", err  # no progress bars of transformers' loading
    r = json.loads(out.read_text())
    s = json.loads((ft_run / "summary.json").read_text())
    assert (r["acc"], r["macro_f1"], r["ece"], r["nll"]) == (s["last_acc"], s["macro_f1"], s["ece"], s["nll"])
    assert r["count"] == s["test_docs"] == 6 and r["truncated"] == s["truncated_test"] and r["max_length"] == 24
    assert "top5" not in r and (r["kind"], r["weights"], r["epoch"]) == ("finetune", "last", 1)
    assert "macro-F1" in line


def by_hand(run, corpus, classes):
    """Logits and labels of a finetune run's saved model and tokenizer on ``corpus``, labels in ``classes``'
    order, at the run's max_length (24)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(run / "model"))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(run / "model")).eval()
    texts, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((corpus / c).glob("*.txt")):
            texts.append(f.read_text())
            labels.append(k)
    with torch.no_grad():
        z = torch.cat([model(**tok([t], truncation=True, max_length=24, return_tensors="pt")).logits for t in texts])
    return z, torch.tensor(labels)


def test_finetune_run_on_another_corpus_and_bad_input(parts, ft_run, tmp_path, capsys):  # noqa: F811
    other = tinylm.make_corpus(tmp_path / "other", per_class=3)
    out = tmp_path / "o.json"
    scored(capsys, ft_run, "--data", other, "--split", "all", "--out", out)
    r = json.loads(out.read_text())
    assert r["count"] == 9 and r["truncated"] == 0 and r["classes"] == ["food", "sport", "tech"]
    # by hand: the run's saved model and tokenizer, the run's max_length
    z, y = by_hand(ft_run, other, ["food", "sport", "tech"])
    assert r["acc"] == pytest.approx(100.0 * float((z.argmax(1) == y).double().mean()), abs=1e-12)
    assert r["nll"] == pytest.approx(nll(z, y), rel=1e-5)
    extra = tinylm.make_corpus(tmp_path / "extra", per_class=3)
    (extra / "music").mkdir()
    for i in range(3):
        (extra / "music" / f"{i}.txt").write_text("the song and the band\n")
    nomodel = tmp_path / "nomodel"
    shutil.copytree(ft_run, nomodel)
    shutil.rmtree(nomodel / "model")
    capsys.readouterr()  # transformers' bars of the hand computation
    cases = {
        "classes": ([ft_run, "--data", extra], ["4 classes, the run has 3"]),
        "best": ([ft_run, "--data", other, "--weights", "best"], ["a finetune run, which keeps only its final weights"]),
        "no weights": ([nomodel, "--data", other], [f"eval {nomodel}: no weights (model/ is missing"]),
        "data dir": ([ft_run, "--data", other, "--data-dir", other], ["--data-dir has no effect on a finetune run"]),
        "no data": ([ft_run, "--data", tmp_path / "nope.csv"], ["nope.csv: not found"]),
    }
    for name, (args, needles) in cases.items():
        dest = tmp_path / f"{name}.json"
        code, _, err = run_cli(capsys, "eval", *args, "--out", dest)
        one_line_error(code, err, *needles)
        assert not dest.exists(), name


def _readme_commands():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("### Evaluate a run", 1)[1].split("\n#", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.startswith("selfkd eval")]


def test_readme_section_runs(digits_run, ft_run, parts, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The README's "Evaluate a run" commands, as written, on a digits run and a finetune run put where they say."""
    cmds = _readme_commands()
    assert len(cmds) == 3
    monkeypatch.chdir(tmp_path)
    shutil.copytree(digits_run, "runs/digits")
    shutil.copytree(ft_run, "runs/bbc-dlb")
    tinylm.make_corpus(tmp_path / "bbc-2025", per_class=3)
    for argv in cmds:
        scored(capsys, *argv[2:])
    r = json.loads(Path("runs/digits-eval.json").read_text())
    assert r["acc"] == json.loads(Path("runs/digits/summary.json").read_text())["last_acc"]
    assert json.loads(Path("all-best.json").read_text())["count"] == 1797
    assert json.loads(Path("bbc-2025.json").read_text())["kind"] == "finetune"


def test_classes_in_another_order_are_mapped_to_the_run_s_labels(parts, tmp_path, capsys):  # noqa: F811
    """A run that declared its classes in another order (label 0 = tech): the corpus's sorted labels are mapped."""
    run = tmp_path / "ordered"
    assert main(["finetune", "--data", str(parts["data"]), "--model", str(parts["model"]), "--method", "ce",
                 "--epochs", "1", "--batch-size", "4", "--lr", "2e-3", "--set", "data.max_length=24",
                 "--set", "data.classes=[tech,food,sport]", "--set", "train.log=csv", "--out", str(run)]) == 0
    other = tinylm.make_corpus(tmp_path / "other", per_class=4)
    for f in ("001", "002"):  # unbalanced: a near-constant prediction still scores a permutation differently
        (other / "tech" / f"{f}.txt").unlink()
    out = tmp_path / "o.json"
    scored(capsys, run, "--data", other, "--split", "all", "--out", out)
    r = json.loads(out.read_text())
    assert r["classes"] == ["tech", "food", "sport"] and r["count"] == 10
    z, y = by_hand(run, other, ["tech", "food", "sport"])  # the run's label order
    assert r["nll"] == pytest.approx(nll(z, y), rel=1e-5)
    assert r["acc"] == pytest.approx(100.0 * float((z.argmax(1) == y).double().mean()), abs=1e-12)
    unmapped = torch.tensor([["food", "sport", "tech"].index(c) for c in ["tech", "food", "sport"]])[y]  # sorted order
    assert nll(z, unmapped) != pytest.approx(r["nll"], rel=1e-4)  # the mapping mattered
