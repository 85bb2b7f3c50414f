"""torch.distributed for selfkd: start-up from torchrun's environment, rank helpers, collectives.

The lowest layer (it imports torch only), so that methods (PS-KD's memory, MrKD's ensembling layer)
and the engine use the same helpers. Every helper is a no-op, or the identity, when no process group
is running or the world has one process: single-process code pays nothing.

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init` reads them (``env://``). The backend is NCCL on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError, SelfKDError

BACKENDS = ("auto", "nccl", "gloo")


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_ranks() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the environment; (0, 0, 1) outside torchrun."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as err:
        raise ConfigError(f"RANK/LOCAL_RANK/WORLD_SIZE: expected integers ({err})") from None


def pick_backend(backend: str, device: torch.device) -> str:
    """The process-group backend for ``device``: NCCL needs CUDA; ``auto`` is NCCL on CUDA, else gloo."""
    if backend not in BACKENDS:
        raise ConfigError(f"train.backend: expected one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "nccl" and (device.type != "cuda" or not torch.cuda.is_available()):
        raise ConfigError("train.backend=nccl needs CUDA devices, but training runs on the CPU "
                          "(use train.backend=gloo or auto on CPU machines)")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def init(device: torch.device, backend: str = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device (``cuda:LOCAL_RANK``)."""
    rank, local, world = env_ranks()
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"RANK={os.environ.get('RANK')} and WORLD_SIZE={os.environ.get('WORLD_SIZE')} are set but "
                          f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start the ranks with "
                          "torchrun or selfkd train --nproc N, or unset RANK and WORLD_SIZE for one process")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    name = pick_backend(backend, device)
    if not dist.is_initialized():
        # init_process_group(init_method="env://") step by step, to keep the rendezvous store (torchrun's
        # agent's, or rank 0's) for the failure records below
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout_s)))
        store.set_timeout(timedelta(seconds=timeout_s))
        dist.init_process_group(name, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        _keep_store(store, rank, world)
    return device


def backend_name() -> str:
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def shutdown(synced: bool = True) -> None:
    """Leave the process group. ``synced``: wait for every rank first (a clean end), so that no rank closes its
    sockets while a peer's last collective still uses them; False after a failure, where a peer may be gone."""
    if dist.is_available() and dist.is_initialized():
        if synced and active():
            try:
                dist.barrier()
            except RuntimeError as err:  # a peer that failed after its last collective has already left
                if not peer_lost(err):
                    raise
        dist.destroy_process_group()


def active() -> bool:
    """A process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device(t: Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo is used here with CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0, rank 0's rows first (ranks may hold different row
    counts). Returned on ``t``'s device. One process: ``t`` itself."""
    if not active():
        return t
    dev = _comm_device(t)
    x = t.to(dev).contiguous()
    n = torch.tensor([x.shape[0]], device=dev, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    top = max(counts)
    if x.shape[0] < top:  # all_gather needs equal shapes: pad, then cut
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in counts]
    dist.all_gather(parts, x)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Average ``tensors`` in place across ranks (one flattened all-reduce)."""
    if not active() or not tensors:
        return
    dev = _comm_device(tensors[0])
    flat = torch.cat([t.reshape(-1).to(dev, torch.float32) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.device, t.dtype))
        offset += n


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (plain containers of tensors, numbers, strings), rank order; serialised with
    ``torch.save`` and read back with ``weights_only=True``. One process: ``[obj]``."""
    if not active():
        return [obj]
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), map_location="cpu", weights_only=True) for b in out]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(ok: bool) -> bool:
    """True on every rank iff ``ok`` is true on every rank (for errors that must stop all ranks)."""
    if not active():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_comm_device(torch.empty(0)))
    dist.all_reduce(flag)
    return int(flag) == 0


def eval_chunks(n: int, chunk: int, rank_: int, world: int) -> list[tuple[int, int]]:
    """This rank's share of ``n`` rows evaluated in chunks of ``chunk``: chunks ``rank, rank+world, ...``
    of the single-process chunking, so every row is computed in the same chunk as in one process."""
    starts = range(rank_ * chunk, n, world * chunk)
    return [(s, min(s + chunk, n)) for s in starts]


def gather_chunks(local: Tensor, n: int, chunk: int) -> Tensor:
    """Reassemble the rows of :func:`eval_chunks` from every rank in the single-process order."""
    world = world_size()
    if world == 1:
        return local
    rows = all_gather_rows(local)
    order = torch.cat([torch.arange(s, e) for r in range(world) for s, e in eval_chunks(n, chunk, r, world)])
    out = torch.empty_like(rows)
    out[order] = rows
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


class SyncBatchNormCPU(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are over every rank's batch, for gloo on the CPU (PyTorch's
    ``nn.SyncBatchNorm`` needs CUDA). Mean, then variance, each one differentiable all-reduce
    (``torch.distributed.nn``), so the gradient is that of BatchNorm over the union of the ranks'
    batches; running statistics as BatchNorm's (unbiased variance over the global count)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        n_local = xf.numel() // xf.shape[1]
        packed = torch.cat([xf.sum(dims), xf.new_tensor([float(n_local)])])
        packed = all_reduce(packed)
        count = packed[-1]
        mean = packed[:-1] / count
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
            assert tracked is not None and running_mean is not None and running_var is not None  # track_running_stats
            with torch.no_grad():
                tracked += 1  # in place, as the buffer's own ``+=``
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp_min(1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @classmethod
    def convert(cls, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` with every BatchNorm replaced (weights and buffers copied)."""
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """SyncBatchNorm for ``device``: PyTorch's on CUDA (NCCL), :class:`SyncBatchNormCPU` on the CPU."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return SyncBatchNormCPU.convert(module)


# -- rank 0 decides, every rank raises ---------------------------------------------------------
def raise_together(fn: Callable[[], Any]) -> None:
    """Call ``fn`` and share rank 0's outcome (a collective): its SelfKDError is raised on every rank."""
    err = None
    try:
        fn()
    except SelfKDError as e:
        err = str(e)
    err = broadcast_object(err)
    if err is not None:
        raise SelfKDError(err)


def on_main(fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only (checks of the run directory); its SelfKDError is raised on every rank."""
    raise_together(fn if is_main() else lambda: None)


@contextlib.contextmanager
def main_first(ctx: contextlib.AbstractContextManager[Any]) -> Iterator[None]:
    """Enter ``ctx`` (rank 0's lock) and share its outcome: an error on rank 0 stops every rank."""
    raise_together(ctx.__enter__)
    try:
        yield
    finally:
        ctx.__exit__(None, None, None)


# -- a rank that dies ------------------------------------------------------------------------------
# A rank that fails writes selfkd/failed/RANK into the rendezvous store before its sockets close; a
# rank whose collective fails because a peer is gone (peer_lost) reads those records to say who failed
# and how, or, for a rank that died without a word (a signal), finds it by its pid on this machine.
_group: dict[str, Any] = {}  # store (a PrefixStore "selfkd/"), rank, world: kept after shutdown()


def _keep_store(store: Any, rank_: int, world: int) -> None:
    if world < 2:
        return
    box = dist.PrefixStore("selfkd", store)
    box.set(f"pid/{rank_}", f"{socket.gethostname()} {os.getpid()}")
    _group.update(store=box, rank=rank_, world=world)


def joined() -> tuple[int, int] | None:
    """(rank, world size) when this process joined a group of several ranks (also after shutdown())."""
    return (_group["rank"], _group["world"]) if _group else None


class Stopped(RuntimeError):
    """SIGTERM under torchrun, raised in the main thread: torchrun's agent stops the other ranks within 0.1 s of
    one ending, often before their next collective fails, and a rank killed by that signal said nothing."""


def _stopped(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: this rank is on its way out and says why first
    raise Stopped("stopped by SIGTERM")


def stop_on_sigterm(on: bool = True) -> None:
    """While ``on``: SIGTERM raises :class:`Stopped` (a peer is lost, as far as the report goes); off: the
    default again unless the report already ignores it."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return
    if on:
        signal.signal(signal.SIGTERM, _stopped)
    elif signal.getsignal(signal.SIGTERM) is _stopped:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def peer_lost(err: BaseException) -> bool:
    """``err`` is a collective that failed because another rank is gone (gloo's connection reset or closed
    by peer, NCCL's remote error), or torchrun's SIGTERM (:class:`Stopped`), not an error of this rank's own."""
    if not _group or not isinstance(err, RuntimeError):
        return False
    if isinstance(err, (dist.DistError, Stopped)):
        return True
    text = str(err)
    return "gloo/transport" in text or "Connection reset by peer" in text or "Connection closed by peer" in text


@contextlib.contextmanager
def _no_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: a store whose host is gone makes c10d log a C++ stack before raising."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def record_failure(how: str, reported: bool) -> None:
    """This rank failed with ``how`` (one line); ``reported``: it says so itself, its peers need not."""
    if not _group:
        return
    with contextlib.suppress(Exception), _no_stderr():  # the store's host may be gone too
        _group["store"].set(f"failed/{_group['rank']}", f"{int(reported)} {how}")


def record_lost() -> None:
    """This rank stops because a peer is gone: it is a survivor, not one of the ranks that died."""
    if _group:
        with contextlib.suppress(Exception), _no_stderr():
            _group["store"].set(f"lost/{_group['rank']}", "1")


def failures() -> dict[int, tuple[bool, str]]:
    """The records of the ranks that failed: rank -> (reported by itself, how); raises if the store is gone."""
    out: dict[int, tuple[bool, str]] = {}
    store = _group["store"]
    with _no_stderr():
        for r in range(_group["world"]):
            key = f"failed/{r}"
            if r != _group["rank"] and store.check([key]):
                flag, _, how = store.get(key).decode().partition(" ")
                out[r] = (flag == "1", how)
    return out


def _proc_end(pid: int) -> str | None:
    """How process ``pid`` of this machine ended ("killed by SIGKILL", "exited with status 1", "" once reaped
    by its parent); None while it runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return ""
    except OSError:
        return None
    if fields[0] not in "ZX":
        return None
    status = int(fields[49]) if len(fields) > 49 else 0  # the wait status of a zombie (Linux 3.5+)
    if status & 0x7F:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(status & 0x7F).name}"
        return f"killed by signal {status & 0x7F}"
    return f"exited with status {status >> 8}" if status else ""


def dead_peers(wait_s: float = 1.0) -> dict[int, str]:
    """The ranks on this machine whose process has ended (rank -> how it ended, "" when no longer known),
    waiting up to ``wait_s`` for one."""
    store, me, host = _group["store"], _group["rank"], socket.gethostname()
    pids = {}
    with _no_stderr():
        for r in range(_group["world"]):
            if r != me and store.check([f"pid/{r}"]) and not store.check([f"lost/{r}"]):  # not a survivor that left
                where, _, pid = store.get(f"pid/{r}").decode().partition(" ")
                if where == host:
                    pids[r] = int(pid)
    deadline = time.monotonic() + wait_s
    while True:
        dead = {r: how for r, pid in pids.items() if (how := _proc_end(pid)) is not None}
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.02)
