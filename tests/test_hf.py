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


def tiny_bert(kind="seq", num_labels=3, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=num_labels, **extra)
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


# -- token losses: the Trainer's global token mean -------------------------------------------------------------------
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # the same function whatever the batch


class Backprop(SelfKDTrainer):
    """Records what each training step backpropagates (the Trainer's value, after its accumulation scaling)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.backprop = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.backprop.append(loss.item())
        return loss


def token_trainer(tmp_path, method, name, batch, accumulate, cls=SelfKDTrainer, data=None, **kw):
    kw = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate, optim="sgd", learning_rate=0.5,
              max_grad_norm=0.0, save_strategy="no", **kw)  # plain SGD, no clipping: the step is the gradient
    return cls(model=tiny_bert("tok", **NO_DROPOUT), args=args(tmp_path, name, **kw),
               train_dataset=data or examples(16, kind="tok", seed=1), data_collator=pad_collator, method=method)


def test_token_loss_over_an_accumulation_window_is_one_step_on_the_doubled_batch(tmp_path):
    """gradient_accumulation_steps=2 with batches of 4 = one step on the batch of 8 (CE on token logits): every token
    weighs 1/N, N the window's tokens, as in the Trainer's own token loss, not 1/(2 n_micro-batch)."""
    ce = Recorder(selfkd.build_method("ce"))
    acc = token_trainer(tmp_path, ce.method, "acc", 4, 2, max_steps=1)
    acc.train()
    big = Recorder(selfkd.build_method("ce"))
    one = token_trainer(tmp_path, big.method, "one", 8, 1, max_steps=1)
    one.train()
    assert [len(c[2]) for c in ce.calls] == [4, 4] and len(big.calls) == 1
    assert sorted(ce.calls[0][2].tolist() + ce.calls[1][2].tolist()) == sorted(big.calls[0][2].tolist())
    tokens = [int((c[1] != IGNORE).sum()) for c in ce.calls]
    assert tokens[0] != tokens[1]  # unequal micro-batches: a mean per micro-batch would weigh their tokens unequally
    a, b = weights(acc.model), weights(one.model)
    init = tiny_bert("tok", **NO_DROPOUT).state_dict()
    for k in a:  # float32 sums in another order (another padded width); a wrong reduction moves them by ~10%
        moved = (b[k].double() - init[k].double()).norm()
        gap = (a[k].double() - b[k].double()).norm()
        assert gap <= 1e-4 * moved + 1e-9, (k, float(gap), float(moved))


@pytest.mark.parametrize("ce_rows", ["all", "new"])
def test_dlb_token_terms_are_means_over_the_window_tokens(tmp_path, ce_rows):
    """DLB on token logits with gradient_accumulation_steps=2: each micro-batch backpropagates
    sum(its CE tokens) / N_ce + α·T²·sum(its repeated tokens' KL) / N_kd, N_ce the window's non-ignored tokens (of the
    new rows with ce_rows="new") and N_kd its repeated rows' non-ignored tokens (by hand)."""
    dlb = Recorder(selfkd.DLB(temperature=2.0, alpha=0.5, ce_rows=ce_rows))
    t = token_trainer(tmp_path, dlb.method, "dlb", 4, 2, cls=Backprop, data=examples(14, kind="tok", seed=2),
                      num_train_epochs=2)
    t.train()
    assert len(dlb.calls) == 8 and len(t.backprop) == 8  # 4 micro-batches per epoch: 2 windows per epoch
    terms, prev = [], None
    for z, y, idx, _ in dlb.calls:
        r = 0 if prev is None else len(prev[2])
        tokens = [(i, p) for i in range(len(y)) for p in range(y.shape[1]) if y[i, p] != IGNORE]
        scored = [(i, p) for i, p in tokens if ce_rows == "all" or i >= r]
        ce = sum(hand_ce(z[i, p].tolist(), int(y[i, p])) for i, p in scored)
        rep = [(i, p) for i, p in tokens if i < r]
        kd = sum(hand_kl(prev[0][i, p].tolist(), z[i, p].tolist(), 2.0) for i, p in rep) * 4.0
        terms.append((ce, len(scored), kd, len(rep)))
        prev = (z[r:], y[r:], idx[r:])
    for w in range(0, 8, 2):
        n_ce = sum(c[1] for c in terms[w : w + 2])
        n_kd = sum(c[3] for c in terms[w : w + 2])
        assert terms[w + 1][1] != terms[w][1] and n_kd > 0
        for j in (w, w + 1):
            want = terms[j][0] / n_ce + 0.5 * terms[j][2] / n_kd
            assert t.backprop[j] == pytest.approx(want, rel=1e-4), (j, t.backprop[j], want)


def test_the_token_reduction_reads_no_device_value(tmp_path):
    """Counting the window's tokens, the method's loss and the rescaling: no host sync (tests/syncs.py), DLB's
    distillation term and CE's."""
    from syncs import SyncCounter

    calls = []

    class Counted(SelfKDTrainer):
        def _count_window(self, *a):
            with SyncCounter() as c:
                out = super()._count_window(*a)
            calls.append(c.calls)
            return out

        def _window_share(self, *a):
            with SyncCounter() as c:
                out = super()._window_share(*a)
            calls.append(c.calls)
            return out

    for method in (selfkd.build_method("ce"), selfkd.DLB(ce_rows="new")):
        token_trainer(tmp_path, method, method.name, 4, 2, cls=Counted, num_train_epochs=1).train()
    assert len(calls) == 2 * (2 + 4) and all(c == [] for c in calls), calls


def test_sequence_classification_keeps_its_mean_per_batch_under_accumulation(tmp_path):
    """[B] labels: each micro-batch's mean over its rows, divided by the accumulation steps (as today, and as the
    Trainer does for a model that takes no loss kwargs)."""
    ce = Recorder(selfkd.build_method("ce"))
    t = Backprop(model=tiny_bert(), args=args(tmp_path, "seq", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                              num_train_epochs=1, save_strategy="no"),
                 train_dataset=examples(14), data_collator=pad_collator, method=ce.method)
    t.train()
    assert len(ce.calls) == 4
    for (z, y, _, _), got in zip(ce.calls, t.backprop):
        mean = sum(hand_ce(z[i].tolist(), int(y[i])) for i in range(len(y))) / len(y)
        assert got == pytest.approx(mean / 2, rel=1e-5)


# -- the host's surfaces: a changed transformers/accelerate fails at construction, in one line ----------------------
def _old_batch_samples(self, epoch_iterator, num_batches):  # transformers 4.4x's signature
    return [], None


def _no_trial(self):
    return ""


@pytest.mark.parametrize("package, owner, name, value", [
    ("transformers", "trainer", "_save_checkpoint", None),
    ("transformers", "trainer", "_get_output_dir", _no_trial),
    ("transformers", "trainer", "_remove_unused_columns", None),
    ("transformers", "trainer", "_get_collator_with_removed_columns", None),
    ("transformers", "trainer", "get_batch_samples", _old_batch_samples),
    ("transformers", "trainer", "loss_is_scaled_for_ga", None),
    ("transformers", "trainer_utils", "rotate_checkpoints", None),
    ("accelerate", "data_loader", "prepare_data_loader", lambda dataloader, device=None: dataloader),
])
def test_a_changed_host_surface_fails_at_construction_in_one_line(tmp_path, monkeypatch, package, owner, name, value):
    import accelerate
    import accelerate.data_loader

    target = {"trainer": transformers.Trainer, "trainer_utils": transformers.trainer_utils,
              "data_loader": accelerate.data_loader}[owner]
    if value is None:
        monkeypatch.delattr(target, name)
    else:
        monkeypatch.setattr(target, name, value)
    version = {"transformers": transformers.__version__, "accelerate": accelerate.__version__}[package]
    with pytest.raises(ConfigError) as err:
        trainer(tmp_path, selfkd.DLB())
    msg = str(err.value)
    assert "\n" not in msg and f"{package} {version} " in msg and name in msg, msg
    assert msg.startswith("SelfKDTrainer needs ")


def test_the_trainers_batch_size_attribute_is_checked(tmp_path, monkeypatch):
    init = transformers.Trainer.__init__

    def without(self, *a, **kw):
        init(self, *a, **kw)
        del self._train_batch_size

    monkeypatch.setattr(transformers.Trainer, "__init__", without)
    with pytest.raises(ConfigError, match=rf"^SelfKDTrainer needs the Trainer's _train_batch_size .*transformers "
                                          rf"{transformers.__version__} has none"):
        trainer(tmp_path, selfkd.DLB())
