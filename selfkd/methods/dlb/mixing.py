"""How DLB combines with mixup/CutMix (``DLB.mix``; ``augment.mix`` in the trainer).

The new rows are mixed among themselves (a permutation of the new rows only, a fresh lam and CutMix
box); the repeated rows re-apply the previous step's mixing of those same samples (same permutation
within the block, same lam, same box) to their fresh views, so the teacher (the cached logits of the
mixed input seen one step earlier) and the student see the same two images in the same proportion;
the KL is unchanged. CE on every row is mixed per row, ``lam_i·CE(z_i, y_i) + (1−lam_i)·CE(z_i, y[index_i])``
(the repeated block with the previous lam, the new block with the fresh one; ``ce_rows`` and
``label_smoothing`` apply as usual). ``schedule="confidence"``: the teacher's confidence ``c`` is its
mean probability of the mixed one-hot target.

``batch.mix`` is a :class:`~selfkd.data.mixing.MixBlocks` ``[(0, previous Mix), (r, new Mix)]`` (a plain
Mix on a step without repeated rows). The last step's Mix is method state (``state_dict``), so a
resumed run mixes identically. With ``repeat_fraction < 1`` the repeated rows are a prefix of the
previous block and its permutation cannot be re-applied: mixing then raises ConfigError. Mixing is
not defined for token logits.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...data.mixing import Mix, MixBlocks, Mixer, remix
from ...errors import ConfigError, TrainingError
from ..base import Batch
from .cache import Layout


def check_mixer(repeat_fraction: float, mixer: Mixer) -> None:
    """ConfigError unless ``mixer`` mixes nothing or every previous new row repeats."""
    if repeat_fraction < 1 and getattr(mixer, "name", None) != "none":
        raise ConfigError(
            f"method 'dlb': repeat_fraction: mixing (augment.mix) needs repeat_fraction=1, so that the repeated "
            f"rows are the whole previous block and its mixing can be re-applied (got {repeat_fraction})"
        )


def mix_batch(batch: Batch, layout: Layout, last: Mix | None, mixer: Mixer, generator: torch.Generator) -> Batch:
    """New rows: mixed among themselves with a fresh draw; repeated rows: ``last`` (the previous step's
    mixing of the same samples) re-applied to their fresh views."""
    r, rows = layout.repeat, layout.repeat + layout.new
    if batch.x.shape[0] != rows:
        raise TrainingError(
            f"DLB: the sampler built a batch of {rows} rows ({r} repeated + {layout.new} new) but mix got "
            f"{batch.x.shape[0]}"
        )
    new_x, new_mix = mixer(batch.x[r:], generator)
    if r == 0:
        return replace(batch, x=new_x, mix=new_mix)
    prev = last
    if prev is None:  # the previous step was not mixed: neither was its teacher's input
        prev = Mix(index=torch.arange(r, device=batch.x.device), lam=1.0, kind="none")
    if prev.index.shape[0] != r:
        raise TrainingError(f"DLB: {r} repeated rows but the previous step mixed {prev.index.shape[0]} new rows")
    rep_x = remix(batch.x[:r], prev)
    return replace(batch, x=torch.cat([rep_x, new_x]), mix=MixBlocks([(0, prev), (r, new_mix)], rows))


def split_mix(mix: Mix | MixBlocks | None, r: int, rows: int, last: Mix | None) -> tuple[Mix | None, Mix | None]:
    """(mix of the repeated rows, mix of the new rows) from a batch's mix, checked against the layout
    and against ``last``, the previous step's mixing of its new rows."""
    if mix is None:
        return None, None
    if isinstance(mix, Mix):
        if r != 0 or mix.index.shape[0] != rows:
            raise TrainingError(
                f"DLB: a single Mix of {mix.index.shape[0]} rows cannot describe a batch of {r} repeated and "
                f"{rows - r} new rows; use dlb.mix (MixBlocks [(0, previous Mix), ({r}, new Mix)])"
            )
        return None, mix
    try:
        rep, new = (mix.block(0) if r else None), mix.block(r)
    except KeyError:
        raise TrainingError(f"DLB: batch.mix must have blocks at rows 0 (repeated) and {r} (new)") from None
    if mix.rows != rows or new.index.shape[0] != rows - r or (rep is not None and rep.index.shape[0] != r):
        raise TrainingError("DLB: batch.mix does not match the batch layout (repeated | new rows)")
    if rep is not None and last is not None and (rep.kind, rep.lam, rep.box) != (last.kind, last.lam, last.box):
        raise TrainingError("DLB: the repeated rows were not mixed as the previous step's new rows; use dlb.mix")
    return rep, new
