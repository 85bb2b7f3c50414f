"""A run's state in its checkpoint: model, optimiser, scheduler, method, every RNG and the sampler
position, gathered over the ranks; and the checks before a resume (format, config, world size)."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import distributed
from ..errors import SelfKDError
from .config import config_diff, config_hash
from .rundir import CHECKPOINT, CONFIG

if TYPE_CHECKING:
    from .trainer import Trainer

FORMAT = 1


def rng_state(gens: dict[str, torch.Generator]) -> dict[str, Any]:
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy global generator, MT19937: its state is a tuple
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in gens.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gens: dict[str, torch.Generator]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    for k, g in gens.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(trainer: Trainer) -> dict[str, Any] | None:
    """The checkpoint (on rank 0; None elsewhere): the model once, every rank's method state, RNG
    states and sampler position (``ranks``: ranks 1.., rank 0's at the top level). Collective."""
    t = trainer
    state = None
    if t.main:
        state = {
            "format": FORMAT, "config": t.cfg.to_dict(), "config_sha256": config_hash(t.cfg),
            "threads": torch.get_num_threads(), "epoch": t.epoch, "global_step": t.global_step,
            "model": t.model.state_dict(), "optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(),
            "method": t.method.state_dict(), "rng": rng_state(t.gens), "history": t.history, "world_size": t.world,
        }
    if t.world == 1:
        return state
    mine = {"method": t.method.state_dict(), "rng": rng_state(t.gens), "sampler_epoch": t.epoch}
    every = distributed.all_gather_objects(mine)
    if state is not None:
        state["ranks"] = every[1:]
    return state


def check_resumable(state: dict[str, Any], trainer: Trainer) -> None:
    """The checkpoint's format, config and world size must be this run's: one line naming what differs."""
    t = trainer
    if state.get("format") != FORMAT:
        raise SelfKDError(f"checkpoint {t.dir / CHECKPOINT}: format {state.get('format')!r} is not {FORMAT}")
    old = state.get("config")
    if isinstance(old, dict) and state.get("config_sha256") != config_hash(t.cfg):
        diff = config_diff(old, t.cfg.to_dict())
        if any(k == "method.name" for k, _, _ in diff):  # another method: its parameters differ anyway
            diff = [d for d in diff if d[0] == "method.name" or not d[0].startswith("method.")]
        diff.sort(key=lambda d: not d[0].endswith(".name"))  # data/model/method names first
        if diff:
            shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff[:3])
            more = f"; and {len(diff) - 3} more" if len(diff) > 3 else ""
            raise SelfKDError(f"--resume {t.dir}: {CONFIG} differs from the config {CHECKPOINT} was trained "
                              f"with ({shown}{more}); restore {CONFIG} or start a new run")
    saved = int(state.get("world_size", 1))
    if saved != t.world:
        raise SelfKDError(f"--resume {t.dir}: the checkpoint was written by {saved} rank{'s' if saved != 1 else ''}, "
                          f"this run has {t.world}; resume with the same world size (--nproc {saved}, or torchrun "
                          f"with nnodes x nproc_per_node = {saved})")


def restore(trainer: Trainer, state: dict[str, Any]) -> None:
    """Load ``state`` (from :func:`capture`) into ``trainer`` after :func:`check_resumable`."""
    t = trainer
    check_resumable(state, t)
    mine = state if t.rank == 0 else state["ranks"][t.rank - 1]
    try:
        t.model.load_state_dict(state["model"])
        t.opt.load_state_dict(state["optimizer"])
        t.sched.load_state_dict(state["scheduler"])
        t.method.load_state_dict(mine["method"])
        set_rng_state(mine["rng"], t.gens)
        t.history = list(state["history"])
        t.epoch = int(state["epoch"])
        t.global_step = int(state["global_step"])
    except SelfKDError:
        raise
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")[:160]
        raise SelfKDError(f"checkpoint {t.dir / CHECKPOINT} does not fit this run's model {t.cfg.model.name!r} and "
                          f"method {t.cfg.method.name!r} ({type(err).__name__}: {first})") from None
