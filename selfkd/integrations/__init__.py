"""selfkd inside other training loops: one small module per library, each an optional extra.

* :mod:`selfkd.integrations.hf`: a Hugging Face ``Trainer`` subclass (``pip install selfkd[hf]``);
* :mod:`selfkd.integrations.finetune`: ``selfkd finetune``, a local Hugging Face model fine-tuned as a
  sequence classifier on labelled text through that Trainer (``pip install selfkd[hf]``, LoRA: ``selfkd[lora]``);
* :mod:`selfkd.integrations.lightning`: a Lightning callback (``pip install selfkd[lightning]``).

Nothing here is imported by ``import selfkd``.
"""
from __future__ import annotations

from ..plugins import require

__all__ = ["require"]
