"""selfkd: self-knowledge distillation for PyTorch.

The three-line use of DLB in any training loop::

    dlb = selfkd.DLB(temperature=3.0, alpha=1.0)
    loader = DataLoader(dataset, batch_sampler=dlb.batch_sampler(RandomSampler(dataset), batch_size=64))
    for x, y in loader:
        loss = dlb(model(x), y)
"""
from .errors import ConfigError, DataError, SelfKDError, TrainingError
from .methods import CE, DLB, Method, Params, StepOutput, available_methods, build_method, register_method
from .models import available_models, build_model, register_model

__version__ = "0.1.0"

__all__ = [
    "CE", "DLB", "Method", "Params", "StepOutput", "available_methods", "build_method", "register_method",
    "available_models", "build_model", "register_model",
    "SelfKDError", "ConfigError", "DataError", "TrainingError", "__version__",
]
