"""Run under ``torchrun --nproc_per_node=2`` by tests/test_hf_ddp.py: SelfKDTrainer on 2 CPU ranks (gloo)
trains a tiny BERT built from a config (no download); every rank writes OUT/<run>/rank{r}.pt."""
import sys
from pathlib import Path

import torch
import transformers

import selfkd
from selfkd.errors import ConfigError
from selfkd.integrations.hf import SelfKDTrainer

N, BATCH, EPOCHS = 24, 5, 2  # 12 samples per rank: new-row batches of 5, 5, 2 (a short last one); 6 steps


def tiny_bert(kind="seq"):
    """Seeded; no dropout, so that 2 ranks and a 1-process twin compute the same function. ``tok``: token classification."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cls = transformers.BertForSequenceClassification if kind == "seq" else transformers.BertForTokenClassification
    return cls(cfg)


def examples(n=N, seed=0, kind="seq"):
    """``tok``: 2 to 24 tokens a row, the first ignored (so the ranks' batches hold unequal token counts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=g)) if kind == "seq" else int(torch.randint(2, 25, (1,), generator=g))
        ids = torch.randint(1, 30, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids[0] % 3} if kind == "seq" else
                   {"input_ids": ids, "labels": [-100] + [t % 3 for t in ids[1:]]})
    return out


def pad_collator(features):
    """Dynamic padding: each batch to its own longest row (token labels padded with -100)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    tokens = isinstance(features[0]["labels"], list)
    labels = torch.full((len(features), width), -100) if tokens else torch.tensor([f["labels"] for f in features])
    for r, f in enumerate(features):
        ids[r, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[r, : len(f["input_ids"])] = 1
        if tokens:
            labels[r, : len(f["labels"])] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


METHODS = {"ce": lambda: selfkd.build_method("ce"), "dlb": lambda: selfkd.DLB(temperature=2.0, alpha=1.0),
           "pskd": lambda: selfkd.build_method("pskd", memory_dtype="float32")}


def args(out, batch=BATCH, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=EPOCHS, learning_rate=0.5,
                optim="sgd", save_strategy="steps", save_steps=1, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, dataloader_pin_memory=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def record(method):
    """Each training step's dataset indices, as the loss received them."""
    seen, inner = [], method.loss

    def loss(logits, target, index=None, **kw):
        seen.append(index.tolist())
        return inner(logits, target, index=index, **kw)

    method.loss = loss
    return seen


class SaveAt(transformers.TrainerCallback):
    """Checkpoints at these global steps only (saving every step costs more than the training)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps


class Counted(SelfKDTrainer):
    """Records the token count (num_items_in_batch) each training step's loss is divided by."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.items = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.items.append(int(num_items_in_batch))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def run(out, name, method, resume=None, trainer_cls=SelfKDTrainer, save_at=(), kind="seq", **kw):
    """Train; returns (trainer, the indices of every step)."""
    m = METHODS[method]()
    seen = record(m)
    t = trainer_cls(model=tiny_bert(kind), args=args(Path(out) / name, **kw), train_dataset=examples(kind=kind),
                    data_collator=pad_collator, method=m, callbacks=[SaveAt(save_at)])
    t.train(resume_from_checkpoint=None if resume is None else str(Path(out) / resume))
    return t, seen


def main(out):
    torch.set_num_threads(1)
    # (run name, method, checkpoint to resume from); checkpoint-3 ends epoch 0 (saved before on_epoch_end),
    # checkpoint-4 is mid-epoch 1
    plan = [("ce", "ce", None), ("ce-from-4", "ce", "ce/checkpoint-4"),
            ("dlb", "dlb", None), ("dlb-from-3", "dlb", "dlb/checkpoint-3"), ("dlb-from-4", "dlb", "dlb/checkpoint-4"),
            ("pskd", "pskd", None), ("pskd-from-3", "pskd", "pskd/checkpoint-3"),
            ("pskd-from-4", "pskd", "pskd/checkpoint-4")]
    for name, method, resume in plan:
        t, seen = run(out, name, method, resume, save_at=() if resume else (3, 4))
        r = t.args.process_index
        torch.save({"world": t.args.world_size, "batches": seen, "state": t.method.state_dict(),
                    "weights": t.model.state_dict(), "log": t.state.log_history}, Path(out) / name / f"rank{r}.pt")
    # token logits, ranks with unequal token counts (plain SGD, no clipping: the step is the gradient)
    for name, method, accumulate, across in [("tok-ce", "ce", 1, True), ("tok-dlb", "dlb", 1, True),
                                             ("tok-dlb-ga2", "dlb", 2, True), ("tok-ce-local", "ce", 1, False)]:
        t, seen = run(out, name, method, trainer_cls=Counted, kind="tok", save_strategy="no", max_grad_norm=0.0,
                      gradient_accumulation_steps=accumulate, average_tokens_across_devices=across)
        r = t.args.process_index
        sampler = type(t.get_train_dataloader().batch_sampler).__name__  # the rank's own batches, no accelerate shard
        torch.save({"world": t.args.world_size, "batches": seen, "weights": t.model.state_dict(), "sampler": sampler,
                    "items": t.items}, Path(out) / name / f"rank{r}.pt")
    try:  # accelerate splitting the method's batches across ranks: refused on every rank
        run(out, "split", "dlb", accelerator_config={"split_batches": True})
        msg = "trained"
    except ConfigError as err:
        msg = str(err)
    (Path(out) / "split" / f"rank{torch.distributed.get_rank()}.txt").write_text(msg)


if __name__ == "__main__":
    main(sys.argv[1])
