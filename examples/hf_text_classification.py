"""DLB on sequence classification with the Hugging Face Trainer, offline: a tiny BERT built from a config
and a synthetic task (is token 7 in the sentence?), dynamic padding, a checkpoint and a resume.

    pip install selfkd[hf]
    python examples/hf_text_classification.py [OUT_DIR]
"""
import sys
import tempfile

import torch
import transformers

import selfkd
from selfkd.integrations.hf import SelfKDTrainer


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 30, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": int(7 in ids)})
    return out


def collate(features):  # pad each batch to its own longest sentence
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    for r, f in enumerate(features):
        ids[r, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([f["labels"] for f in features])}


def main(out):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=16, num_train_epochs=4,
                                          learning_rate=3e-3, save_strategy="epoch", logging_steps=10, report_to=[],
                                          use_cpu=True, disable_tqdm=True, seed=0)
    trainer = SelfKDTrainer(model=model, args=args, train_dataset=data(256, 0), eval_dataset=data(128, 1),
                            data_collator=collate, method=selfkd.DLB(temperature=3.0, alpha=1.0, schedule="confidence"))
    trainer.train()  # stop it at any point and run trainer.train(resume_from_checkpoint=True): it continues exactly
    print({k: round(v, 4) for k, v in trainer.evaluate().items() if k in ("eval_loss", "epoch")})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
