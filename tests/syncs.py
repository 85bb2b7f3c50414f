"""Count the operations that make the host wait for the device, on the CPU.

``torch.cuda.set_sync_debug_mode`` needs a GPU. On the CPU nothing waits, but the same Python code
issues the same aten operations, and a TorchDispatchMode sees every one of them. ``SyncCounter``
records each operation that, on a CUDA tensor, must copy a value to the host before Python can go on:

* ``_local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``;
* ``equal`` (``torch.equal``), ``is_nonzero``;
* operations whose output shape depends on the values: ``nonzero``, ``masked_select``, ``unique``,
  boolean-mask indexing and ``repeat_interleave`` without ``output_size``.

Host-side checks in selfkd read CPU tensors through numpy (``selfkd.methods.base.host_equal``), which
cannot touch device memory (``.numpy()`` refuses CUDA tensors) and issues no aten operation, so a
count of zero means the step reads no device value. ``.tolist()``/``.cpu()`` of a device tensor are
copies the CPU cannot tell from no-ops: these the counter cannot see.
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNCING = {
    aten._local_scalar_dense, aten.equal, aten.is_nonzero, aten.nonzero, aten.nonzero_static, aten.masked_select,
    aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
}


def _bool_index(args) -> bool:
    for a in args:
        if isinstance(a, (list, tuple)):
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a):
                return True
    return False


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...``; ``c.calls`` lists (op name, where in selfkd it was called)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        hit = packet in SYNCING
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and _bool_index(args):
            hit = True
        if packet is aten.repeat_interleave and (kwargs or {}).get("output_size") is None:
            hit = True
        if hit:
            where = next((f"{f.filename.split('selfkd/')[-1]}:{f.lineno}" for f in reversed(traceback.extract_stack())
                          if "/selfkd/" in f.filename and "/tests/" not in f.filename), "?")
            self.calls.append((str(func), where))
        return func(*args, **(kwargs or {}))
