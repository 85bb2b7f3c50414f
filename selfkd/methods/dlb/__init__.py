"""DLB: Self-Distillation from the Last Mini-Batch (Shen et al., CVPR 2022, arXiv 2203.16172).

Semantics pinned to the official code (github.com/Meta-knowledge-Lab/DLB, dlb.py @8949a46):

* each step's batch is ``[repeated rows | new rows]``; the repeated rows are the previous step's
  new samples, fetched again from the Dataset, so a random augmentation gives them a fresh view;
* ``L = CE(all rows) + α · T² · KL(softmax(z_prev/T) ‖ softmax(z_rep/T))``, the KL averaged over the
  repeated rows (``batchmean``). ``z_prev`` are the logits the model produced for those samples one
  step earlier (before that step's update), detached; only the current forward gets gradients;
* the first step has no repeated rows; the state carries across epoch boundaries (the official
  code initialises it once, before epoch 0); a short last batch works.

``batch_size`` counts the *new* samples per step, as the official ``--batch_size`` does: a step
holds up to ``batch_size`` repeated rows plus ``batch_size`` new ones, so the paper's mini-batch of
``n`` rows is ``batch_size = n/2``. Every sample is forwarded twice per epoch.

Only the last step's logits (``batch_size x K``, in ``cache_dtype``, or their top ``cache_topk``) and labels are kept. Beside the class:
:mod:`~selfkd.methods.dlb.method` (the class and its sampler), :mod:`~selfkd.methods.dlb.params`,
:mod:`~selfkd.methods.dlb.schedules` (α and T over training, per-row weights),
:mod:`~selfkd.methods.dlb.mixing` (DLB with mixup/CutMix) and :mod:`~selfkd.methods.dlb.cache`
(batch layouts, the cache, the checks of the repeated rows, token logits and dynamic padding).

**Distributed** (DDP): shard first, then pair. The sampler wraps this rank's ``DistributedSampler``,
so each rank's batch is ``[this rank's previous new rows | this rank's new rows]``: the repeated rows
sit on the rank that holds their cached logits, and no logits cross ranks. ``DistributedSampler``
pads every rank to the same sample count, so all ranks have equal row counts at every step (none
blocks the gradient all-reduce on a short batch). The loss per rank is the one above; for ``[B, K]``
logits DDP's average of the gradients equals one process whose batch is the union of the ranks' batches
(``[every rank's repeated | every rank's new]``, CE a mean over all rows, KL a batchmean over all repeated
rows). Token logits hold unequal token counts per rank: the union needs means over every rank's tokens,
which the Hugging Face integration takes (:meth:`DLB.token_counts`: CE over the non-ignored tokens, KL over
the repeated ones). The cache, the order and the position are per-rank state, saved for every rank.
"""
from .cache import Layout, Layouts
from .method import DLB, DLBBatchSampler
from .params import SCHEDULES, DLBParams

__all__ = ["DLB", "DLBBatchSampler", "DLBParams", "Layout", "Layouts", "SCHEDULES"]
