"""selfkd.integrations.hf: a real transformers Trainer with tiny BERTs built from a config (no download)."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import selfkd  # noqa: E402
from selfkd.errors import ConfigError  # noqa: E402
from selfkd.integrations.hf import STATE, SelfKDTrainer  # noqa: E402
from selfkd.methods.losses import IGNORE  # noqa: E402

from handmath import hand_ce, hand_kl  # noqa: E402


def tiny_bert(kind="seq", num_labels=3, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    cls = transformers.BertForSequenceClassification if kind == "seq" else transformers.BertForTokenClassification
    return cls(cfg)


def examples(n=14, kind="seq", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 10, (1,), generator=g))
        ids = torch.randint(1, 30, (length,), generator=g).tolist()
        if kind == "seq":
            out.append({"input_ids": ids, "labels": ids[0] % 3})
        else:
            lab = [t % 3 for t in ids]
            lab[0] = IGNORE  # e.g. a [CLS] position
            out.append({"input_ids": ids, "labels": lab})
    return out


def pad_collator(features):
    """Dynamic padding: each batch to its own longest row (so a repeated row may change length)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    tokens = isinstance(features[0]["labels"], list)
    labels = torch.full((len(features), width), IGNORE) if tokens else torch.tensor([f["labels"] for f in features])
    for r, f in enumerate(features):
        n = len(f["input_ids"])
        ids[r, :n] = torch.tensor(f["input_ids"])
        mask[r, :n] = 1
        if tokens:
            labels[r, :n] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def args(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, num_train_epochs=3, learning_rate=5e-3,
                save_strategy="steps", save_steps=5, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, dataloader_pin_memory=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def trainer(tmp_path, method, kind="seq", name="run", data=None, **kw):
    return SelfKDTrainer(model=tiny_bert(kind), args=args(tmp_path, name, **kw), train_dataset=data or examples(kind=kind),
                         data_collator=pad_collator, method=method)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recorder:
    """Wraps a method's loss: records each training step's inputs and output (the Trainer's calls, as made)."""

    def __init__(self, method):
        self.method, self.calls = method, []
        inner = method.loss

        def loss(logits, target, index=None, **kw):
            out = inner(logits, target, index=index, **kw)
            self.calls.append((logits.detach().clone(), target.clone(), index.clone(), out))
            return out

        method.loss = loss


def test_dlb_on_sequence_classification_matches_hand_computation(tmp_path):
    dlb = selfkd.DLB(temperature=2.0, alpha=0.7)
    rec = Recorder(dlb)
    t = trainer(tmp_path, dlb, num_train_epochs=1, learning_rate=0.3)  # a large step: teacher and student differ
    t.train()
    assert len(rec.calls) == math.ceil(14 / 4)
    prev = None
    for z, y, idx, out in rec.calls:
        r = 0 if prev is None else len(prev[2])
        if prev is not None:  # repeated rows lead, as the sampler built them, with the previous step's logits as teacher
            assert torch.equal(idx[:r], prev[2])
        ce = sum(hand_ce(z[i].tolist(), int(y[i])) for i in range(len(y))) / len(y)
        kd = 0.0 if r == 0 else sum(hand_kl(prev[0][i].tolist(), z[i].tolist(), 2.0) for i in range(r)) / r * 4.0
        assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-5)
        assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-4)
        assert out.loss.item() == pytest.approx(ce + 0.7 * kd, rel=1e-5)
        prev = (z[r:], y[r:], idx[r:])
    # every sample is new exactly once in the epoch
    news, r = [], 0
    for _, _, idx, _ in rec.calls:
        news += idx[r:].tolist()
        r = len(idx) - r
    assert sorted(news) == list(range(14))
    logged = [h for h in t.state.log_history if "selfkd/kd" in h]
    assert logged and all("selfkd/ce" in h for h in logged)


def test_dlb_on_token_logits_masks_ignored_and_realigns_padding(tmp_path):
    dlb = selfkd.DLB(temperature=3.0, alpha=1.0)
    rec = Recorder(dlb)
    t = trainer(tmp_path, dlb, kind="tok", num_train_epochs=2, learning_rate=0.3)
    t.train()
    widths_changed = 0
    prev = None
    for z, y, idx, out in rec.calls:
        r = 0 if prev is None else len(prev[2])
        tokens = [(i, p) for i in range(len(y)) for p in range(y.shape[1]) if y[i, p] != IGNORE]
        ce = sum(hand_ce(z[i, p].tolist(), int(y[i, p])) for i, p in tokens) / len(tokens)
        assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-5)
        if r:
            pz, py, _ = prev
            widths_changed += pz.shape[1] != z.shape[1]
            rep = [(i, p) for i, p in tokens if i < r]
            assert all(py[i, p] == y[i, p] for i, p in rep)  # right padding: same positions
            kd = sum(hand_kl(pz[i, p].tolist(), z[i, p].tolist(), 3.0) for i, p in rep) / len(rep) * 9.0
            assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-4)
        prev = (z[r:], y[r:], idx[r:])
    assert widths_changed > 0  # the data really exercised a repeated row padded to another length


@pytest.mark.parametrize("method", [
    lambda: selfkd.DLB(schedule="linear", ramp_epochs=2, alpha=1.0),
    lambda: selfkd.DLB(schedule="confidence"),
    lambda: selfkd.build_method("pskd"),
    lambda: selfkd.build_method("ce"),
], ids=["dlb-linear", "dlb-confidence", "pskd", "ce"])
def test_resume_equals_uninterrupted(tmp_path, method):
    """Train 3 epochs (14 samples, batch 4: 4 steps each); resume from the mid-epoch checkpoint at step 5."""
    full = trainer(tmp_path, method(), name="full")
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-5"
    assert (ckpt / STATE).is_file()
    resumed = trainer(tmp_path, method(), name="resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = weights(full.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.method.state_dict().keys() == resumed.method.state_dict().keys()
    for k, v in full.method.state_dict().items():
        w = resumed.method.state_dict()[k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def test_other_methods_run_and_refusals(tmp_path):
    for m in (selfkd.build_method("ls"), selfkd.build_method("tfkd-reg")):
        t = trainer(tmp_path, m, name=m.name, num_train_epochs=1)
        t.train()
        assert any(f"selfkd/{p}" in h for h in t.state.log_history for p in ("smooth", "kd"))
    with pytest.raises(ConfigError, match="forward passes of its own"):
        trainer(tmp_path, selfkd.build_method("cskd"))
    with pytest.raises(ConfigError, match="forward passes of its own"):
        trainer(tmp_path, selfkd.DLB(forward="split"))
    with pytest.raises(ConfigError, match="label_smoothing_factor"):
        trainer(tmp_path, selfkd.DLB(), label_smoothing_factor=0.1)
    with pytest.raises(ConfigError, match="resume_from_checkpoint=True: no checkpoint"):
        trainer(tmp_path, selfkd.DLB(), name="empty").train(resume_from_checkpoint=True)


def test_evaluation_leaves_method_state_alone(tmp_path):
    dlb = selfkd.DLB()
    t = trainer(tmp_path, dlb, num_train_epochs=1, eval_strategy="no")
    t.train()
    before = dlb.state_dict()
    metrics = t.evaluate(eval_dataset=examples(6, seed=3))
    assert math.isfinite(metrics["eval_loss"])
    after = dlb.state_dict()
    assert all(torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor) else before[k] == after[k]
               for k in before)


def test_readme_example_method_runs_in_the_trainer(tmp_path, monkeypatch):
    """examples/confidence_penalty.py, unchanged, as the README says (registered only for this test)."""
    import importlib
    import sys
    from pathlib import Path

    from selfkd.methods import registry

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    monkeypatch.delitem(sys.modules, "confidence_penalty", raising=False)
    with registry.METHODS.scope():
        mod = importlib.import_module("confidence_penalty")
        try:
            rec = Recorder(mod.ConfidencePenalty(beta=0.3))
            trainer(tmp_path, rec.method, num_train_epochs=1).train()
            z, y, _, out = rec.calls[-1]
            p = torch.softmax(z, 1)
            entropy = -(p * p.log()).sum(1).mean().item()
            ce = sum(hand_ce(z[i].tolist(), int(y[i])) for i in range(len(y))) / len(y)
            assert out.loss.item() == pytest.approx(ce - 0.3 * entropy, rel=1e-5)
        finally:
            sys.modules.pop("confidence_penalty", None)


def test_checkpoints_are_renamed_into_place_and_resume_skips_incomplete_ones(tmp_path):
    """Each checkpoint is staged and renamed once complete; resume_from_checkpoint=True takes the newest
    complete one (a folder a killed save of an older selfkd left, without trainer or method state, is passed over)."""
    from selfkd.integrations.hf import SAVING, last_checkpoint

    full = trainer(tmp_path, selfkd.DLB(), name="full", num_train_epochs=2)  # 8 steps: checkpoints 5 and 8
    full.train()
    out = tmp_path / "full"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-5", "checkpoint-8"]  # no staging folder left
    assert not (out / SAVING).exists()
    (out / "checkpoint-8" / STATE).unlink()  # as a kill after the Trainer's files, before the method's, left it
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "config.json").write_text("{}")
    assert last_checkpoint(str(out)) == str(out / "checkpoint-5")
    again = trainer(tmp_path, selfkd.DLB(), name="full", num_train_epochs=2)
    again.train(resume_from_checkpoint=True)
    a, b = weights(full.model), weights(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
