"""Self-distillation methods on one contract (see :mod:`selfkd.methods.base`)."""
from .base import Batch, Method, Params, StepOutput
from .registry import available_methods, build_method, method_class, register

# Importing a method module registers it.
from .ce import CE
from .dlb import DLB, DLBBatchSampler

__all__ = [
    "Batch", "Method", "Params", "StepOutput", "available_methods", "build_method", "method_class",
    "register", "CE", "DLB", "DLBBatchSampler",
]
