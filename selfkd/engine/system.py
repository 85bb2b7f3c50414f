"""What a run asks of the process: its peak memory, its thread count, the compiled forward and its caches."""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError
from ..nn_utils import DynamicBatch
from .rundir import CHECKPOINT


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(model)`` with a dynamic batch dimension (:class:`selfkd.nn_utils.DynamicBatch`)."""
    # torch.compile's stub returns a callable; given a Module it returns an OptimizedModule (a Module)
    return DynamicBatch(cast(nn.Module, torch.compile(model, mode=None if mode == "default" else mode)))


def check_compile_cache(folder: str | os.PathLike, key: str = "train.compile_cache") -> Path:
    """``folder`` made (with its parents) and written to once, else a one-line ConfigError naming it."""
    path = Path(folder).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"{key} = {str(folder)!r}: cannot write there ({err.strerror or err}); "
                          "choose a writable folder for the compiled graphs") from None
    return path


@contextlib.contextmanager
def compile_cache(folder: Path | None) -> Iterator[None]:
    """Inductor's on-disk caches (compiled graphs, AOTAutograd's and the FX graph cache, Triton's kernels)
    in ``folder`` for the scope, so a later run or a resume with the same folder loads what an earlier one
    compiled; None: inductor's own default folder (``TORCHINDUCTOR_CACHE_DIR``, else a temp folder)."""
    if folder is None:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir  # only when compiling

    with temporary_cache_dir(str(folder)):
        yield


class CompileClock:
    """Seconds spent compiling (dynamo's frames and AOTAutograd's deferred backward) while active:
    torch's compilation start/end callbacks, nested compilations counted once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0: float | None = None

    def _start(self, args: Any) -> None:
        self._t0 = time.perf_counter()

    def _end(self, args: Any) -> None:
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    @contextlib.contextmanager
    def active(self) -> Iterator["CompileClock"]:
        from torch._dynamo.callback import callback_handler  # only when compiling

        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        try:
            yield self
        finally:
            callback_handler.remove_start_callback(self._start)
            callback_handler.remove_end_callback(self._end)


def reset_peak_mem(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or on Linux the process's peak resident set
    (writing 5 to ``/proc/self/clear_refs`` resets VmHWM), so runs that share a process (sweeps) each
    report their own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere: the process's lifetime peak


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's lifetime peak


_LIBC: Any = None


def release_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Training frees its activations into the heap, where glibc keeps them; evaluation's larger batches
    are then mapped anew on top, so without this the peak resident set is the training heap plus the
    evaluation's working set instead of the larger of the two. Called between the phases of an epoch
    (a few milliseconds), never in a step: the next step would fault the pages in again."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def thread_scope() -> Iterator[None]:
    """Restore torch's thread count after a run (a resumed run may set its recorded count)."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def resume_threads(saved: Any, chosen: int | None, run_dir: Path, log: Callable[[str], None]) -> None:
    """Bit-identical resume needs the thread count the run was started with: reuse the recorded ``saved``
    unless the caller ``chosen`` a count, and say so when they differ."""
    if not isinstance(saved, int) or saved < 1:
        return
    if chosen is None:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)
            log(f"{run_dir}: resuming with {saved} thread{'s' if saved != 1 else ''} as recorded in "
                f"{CHECKPOINT} (bit-identical results need the same count; --threads overrides)")
    elif chosen != saved:
        log(f"{run_dir}: resuming with {chosen} threads, the run started with {saved}: the "
            "results will not be bit-identical to an uninterrupted run")


def cpu_info() -> dict[str, str]:
    """The host CPU's model name and the kernels torch dispatches to on it (AVX2 vs AVX512 on x86): float
    results, and so a run's exact numbers, depend on both, so summary.json records them."""
    name = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {"cpu": name or platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
