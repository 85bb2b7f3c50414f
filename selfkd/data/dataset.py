"""In-memory data sets: :class:`ArrayDataset` (uint8 images + int64 labels) and :class:`DataBundle`."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError

SHARE_ABOVE = 4 << 20  # bytes of images per batch above which a worker hands the batch over in shared memory


def in_worker() -> bool:
    """Whether this runs in a DataLoader worker process."""
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


def _as_list(images: Any, labels: np.ndarray, idx: np.ndarray) -> list[torch.Tensor]:
    """The main process's side of :class:`_WorkerBatch`: what the default collate makes of a batch tuple."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(images)
    return [x, torch.from_numpy(labels), torch.from_numpy(idx)]


class _WorkerBatch:
    """A batch gathered or decoded in a loader worker, pickled to the main process as one object: the
    images by value (small batches: a pipe copy is cheaper than handing over a descriptor) or as one
    shared-memory tensor, labels and indices by value. Three tensors returned as they are would cross
    as three shared-memory descriptors, one connection to the worker each. It unpickles to
    ``[images, labels, indices]``, what the default collate makes of the batch tuple (it passes this
    object through untouched, being neither a tensor nor a sequence)."""

    def __init__(self, images: np.ndarray, labels: torch.Tensor, idx: torch.Tensor) -> None:
        self.images, self.labels, self.idx = images, labels.numpy(), idx.numpy()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        x: Any = self.images
        if x.nbytes > SHARE_ABOVE:
            x = torch.from_numpy(x).share_memory_()
        return (_as_list, (x, self.labels, self.idx))


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{what}: expected a tensor or array, got {type(x).__name__} ({e})") from None


def _check_labels(labels: Any, n: int, num_classes: int | None, what: str) -> torch.Tensor:
    t = _as_tensor(labels, what)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise DataError(f"{what}: expected integer labels, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise DataError(f"{what}: expected shape ({n},), got {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.int64).contiguous()
    if n:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bad = lo if lo < 0 else hi
            rng = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise DataError(f"{what}: label {bad} out of range {rng}")
    return t


class ArrayDataset(Dataset):
    """A data set held in memory as one uint8 tensor ``images`` [N, C, H, W] and int64 ``labels`` [N].

    ``ds[i]`` is ``(images[i], labels[i], i)``: the sample index comes back so that methods can keep
    per-sample memory; the default ``DataLoader`` collate turns a batch into
    ``(uint8 [B, C, H, W], int64 [B], int64 [B])``. Augmentation and normalisation happen later, per
    batch and on the training device (:class:`selfkd.data.BatchAugment`).

    ``num_classes`` (optional) is used to range-check labels here and in :meth:`with_labels`.
    """

    def __init__(self, images: Any, labels: Any, num_classes: int | None = None) -> None:
        imgs = _as_tensor(images, "images")
        if imgs.dtype != torch.uint8 or imgs.dim() != 4:
            raise DataError(f"images: expected a uint8 tensor [N, C, H, W], got {imgs.dtype} of shape {tuple(imgs.shape)}")
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1):
            raise DataError(f"num_classes: expected a positive integer, got {num_classes!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.images = imgs.detach().to("cpu").contiguous()
        self.labels = _check_labels(labels, imgs.shape[0], self.num_classes, "labels")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        i = operator.index(index)
        n = self.images.shape[0]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a data set of {n} samples")
        return self.images[i], self.labels[i], i

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        _, c, h, w = self.images.shape
        return c, h, w

    def batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images[idx], labels[idx], idx)`` for a list of indices: one gather per tensor, no per-sample
        ``__getitem__`` and no collate. Indices are checked as :meth:`__getitem__` checks them."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        n = self.images.shape[0]
        if idx.numel():
            a = idx.numpy()
            lo, hi = int(a.min()), int(a.max())
            if lo < -n or hi >= n:
                raise IndexError(f"index {lo if lo < -n else hi} out of range for a data set of {n} samples")
            if lo < 0:
                idx = torch.where(idx < 0, idx + n, idx)
        # images may live on the training device (data.on_device): gather there; labels and indices stay on the CPU
        return self.images[idx.to(self.images.device, non_blocking=True)], self.labels[idx], idx

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same data set with its images on ``device`` (labels stay on the CPU, where the batch-layout
        checks read them); for ``data.on_device``."""
        out = ArrayDataset.__new__(ArrayDataset)
        out.num_classes, out.labels = self.num_classes, self.labels
        out.images = self.images.to(device)
        return out

    def with_labels(self, new_labels: Any) -> ArrayDataset:
        """The same images (shared, not copied) with other labels, e.g. noisy ones. DataError when the
        labels are not integers of shape [N] in [0, num_classes)."""
        out = ArrayDataset.__new__(ArrayDataset)
        out.num_classes = self.num_classes
        out.images = self.images
        out.labels = _check_labels(new_labels, len(self), self.num_classes, "with_labels")
        return out

    def subset(self, indices: Any) -> ArrayDataset:
        """A copy holding only ``indices`` (images and labels), keeping ``num_classes``."""
        idx = _as_tensor(indices, "subset").to(torch.int64).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise DataError(f"subset: indices must lie in [0, {n})")
        return ArrayDataset(self.images[idx].contiguous(), self.labels[idx].contiguous(), self.num_classes)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ArrayDataset(n={n}, shape=({c}, {h}, {w}), num_classes={self.num_classes})"


class Split(Protocol):
    """What a :class:`DataBundle` split offers, read by batches: :class:`ArrayDataset`, ``PackedDataset``
    (data.packed) and ``StreamDataset`` (data.stream) alike."""

    @property
    def labels(self) -> torch.Tensor: ...
    @property
    def num_classes(self) -> int | None: ...
    @property
    def image_shape(self) -> tuple[int, int, int]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> tuple[torch.Tensor, torch.Tensor, int]: ...
    def batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def subset(self, indices: Any) -> Split: ...
    def with_labels(self, new_labels: Any) -> Split: ...


@dataclass
class DataBundle:
    """A loaded data set: the two splits and what a trainer needs to know about them.

    ``mean``/``std`` are per-channel, in [0, 1] units, computed from the training images.
    ``default_augment`` is ``dict(crop_padding=int, flip=bool)`` for :class:`BatchAugment`.
    """

    name: str
    train: Split  # an ArrayDataset, a PackedDataset or a StreamDataset
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_augment: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train.image_shape[0])

    @property
    def image_size(self) -> int:
        return int(self.train.image_shape[1])

    def __repr__(self) -> str:
        return (f"DataBundle(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, "
                f"classes={self.num_classes}, channels={self.channels}, image_size={self.image_size})")


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] to [N, C, size, size]: bilinear with antialiasing, rounded."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for s in range(0, n, chunk):
        x = images[s : s + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s : s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


class BatchView(Dataset):
    """A batch-level view of a :class:`Split` (e.g. an :class:`ArrayDataset`): ``view[list_of_indices]`` is the whole batch.

    Use it with ``DataLoader(BatchView(ds), sampler=batch_sampler, batch_size=None)``: each step is
    one indexing operation per tensor instead of ``B`` calls of ``__getitem__`` and a collate. In a
    loader worker the batch is handed over as one :class:`_WorkerBatch` (one contiguous uint8 array,
    labels and indices by value) that reaches the main process as ``[images, labels, indices]``, the
    list the default collate makes of the tuple at 0 workers: the same batches, in the same order.
    """

    def __init__(self, data: Split) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices: Any) -> Any:
        b = self.data.batch(indices)
        if in_worker() and isinstance(b, tuple) and len(b) == 3 and all(isinstance(t, torch.Tensor) and t.device.type == "cpu"
                                                                         for t in b):
            x, y, idx = b
            return _WorkerBatch(x.contiguous().numpy(), y, idx)
        return b
