"""selfkd inside other training loops: one small module per library, each an optional extra.

* :mod:`selfkd.integrations.hf`: a Hugging Face ``Trainer`` subclass (``pip install selfkd[hf]``);
* :mod:`selfkd.integrations.finetune`: ``selfkd finetune``, a local Hugging Face model fine-tuned as a
  sequence classifier on labelled text through that Trainer (``pip install selfkd[hf]``, LoRA: ``selfkd[lora]``);
* :mod:`selfkd.integrations.lightning`: a Lightning callback (``pip install selfkd[lightning]``).

Nothing here is imported by ``import selfkd``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{module} is not installed ({err.msg}); install it with: pip install selfkd[{extra}]") from None
