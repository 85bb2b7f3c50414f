"""Self-distillation methods on one contract (see :mod:`selfkd.methods.base`).

Importing a method module registers it under its CLI name; ``selfkd methods`` lists them all.
"""
from .base import Batch, Method, Params, StepOutput
from .registry import METHODS, available_methods, build_method, method_class, register_method

from .byot import BYOT, MultiExit
from .ce import CE
from .cskd import CSKD, PairBatchSampler
from .ddgsd import DDGSD
from .dlb import DLB, DLBBatchSampler
from .ls import LS
from .lsrkd import LsrKD
from .lsrkd_tc import LsrKDTC
from .mrkd import MrKD
from .mrkd_tc import MrKDTC
from .pskd import PSKD
from .tfkd_reg import TfKDReg
from .tfkd_self import TfKDSelf
from .zipf_ls import ZipfLS

__all__ = [
    "Batch", "Method", "Params", "StepOutput", "available_methods", "build_method", "method_class", "METHODS", "register_method",
    "BYOT", "CE", "CSKD", "DDGSD", "DLB", "DLBBatchSampler", "LS", "LsrKD", "LsrKDTC", "MrKD", "MrKDTC",
    "MultiExit", "PSKD", "PairBatchSampler", "TfKDReg", "TfKDSelf", "ZipfLS",
]
