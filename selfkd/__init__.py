"""selfkd: self-knowledge distillation for PyTorch.

The three-line use of DLB in any training loop::

    dlb = selfkd.DLB(temperature=3.0, alpha=1.0)
    loader = DataLoader(dataset, batch_sampler=dlb.batch_sampler(RandomSampler(dataset), batch_size=64))
    for x, y in loader:
        loss = dlb(model(x), y)

``import selfkd`` is fast: torch and the methods load on first use of a name that needs them
(``selfkd.DLB``, ``selfkd.build_method``, ...), so ``selfkd --help`` starts in a fraction of a second.
"""
from .errors import ConfigError, DataError, SelfKDError, TrainingError

__version__ = "0.1.0"

_LAZY = {**{k: "methods" for k in ("CE", "DLB", "Method", "Params", "StepOutput", "available_methods",
                                    "build_method", "register_method")},
         **{k: "models" for k in ("available_models", "build_model", "register_model")}}

__all__ = [
    "CE", "DLB", "Method", "Params", "StepOutput", "available_methods", "build_method", "register_method",
    "available_models", "build_model", "register_model",
    "SelfKDError", "ConfigError", "DataError", "TrainingError", "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'selfkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
