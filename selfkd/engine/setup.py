"""Everything a run is built from, before any file is written (so bad input writes nothing): the device,
the data (subsets, label noise), augmentation and mixing, the model and the method, checked together
with one dry forward pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..data import ArrayDataset, BatchAugment, Mixer, apply_label_noise, build_mixer, build_policy, load_dataset
from ..data.dataset import DataBundle
from ..data.policies import Policy
from ..errors import ConfigError
from ..methods import Method, build_method
from ..models import build_model
from .config import AugmentCfg, Config
from .logs import check as check_logs


def select_device(name: str) -> torch.device:
    """The training device; under torchrun on CUDA, this rank's GPU (``cuda:LOCAL_RANK``)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    dev = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if distributed.active() else 0)
    return dev


@dataclass
class Setup:
    """Everything built from a config before any file is written (so bad input writes nothing)."""

    cfg: Config
    device: torch.device
    train: ArrayDataset
    test: ArrayDataset
    clean_labels: torch.Tensor
    num_classes: int
    augment: BatchAugment
    policies: list[Policy]  # uint8 -> uint8, before crop/flip/normalise
    mixer: Mixer | None  # mixup/CutMix on the normalised batch, applied through the method
    model: nn.Module
    method: Method
    channels_last: bool
    amp_dtype: torch.dtype | None
    data_info: dict[str, Any] = field(default_factory=dict)  # classes, mean, std, image size (rundir.DATA_INFO)

    @property
    def noisy(self) -> bool:
        """Whether label noise changed any training label."""
        return bool((self.train.labels != self.clean_labels).any())

    def label_noise_record(self) -> dict[str, Any]:
        """What ``rundir.LABEL_NOISE`` holds: the noise settings and every corrupted sample."""
        noise = self.cfg.data.noise
        bad = torch.nonzero(self.train.labels != self.clean_labels).flatten()
        return {"kind": noise.kind, "rate": noise.rate, "seed": noise.seed, "num_samples": len(self.train),
                "num_corrupted": len(bad), "corrupted": bad.tolist(), "noisy_labels": self.train.labels[bad].tolist(),
                "true_labels": self.clean_labels[bad].tolist()}


def build(cfg: Config) -> Setup:
    device = select_device(cfg.train.device)
    bundle = load_dataset(
        cfg.data.name, root=cfg.data.dir, download=cfg.data.download,
        image_size=cfg.data.image_size, cache_dir=cfg.data.cache_dir,
        stream=cfg.data.stream, stream_above_mb=cfg.data.stream_above_mb,
        subset=cfg.data.subset, test_subset=cfg.data.test_subset, subset_seed=cfg.data.subset_seed,
    )
    train, test, clean = _splits(cfg, bundle)
    augment, policies = _augmentation(cfg.augment, bundle)
    aug = cfg.augment
    mixer = build_mixer(aug.mix, alpha=aug.mix_alpha, prob=aug.mix_prob) if aug.mix != "none" else None
    check_logs(cfg.train.log)
    torch.manual_seed(cfg.train.seed)  # model init is part of the seeded run
    model = build_model(cfg.model.name, num_classes=bundle.num_classes, in_channels=bundle.channels)
    method = build_method(cfg.method.name, **cfg.method.params())
    if mixer is not None and not type(method).supports_mix:
        raise ConfigError(f"augment.mix={aug.mix}: method '{method.name}' does not define targets for mixed samples")
    if mixer is not None:
        method.check_mix(mixer)  # e.g. DLB's repeat_fraction < 1 cannot re-apply a mix: fail before writing
    method.setup(num_samples=len(train), num_classes=bundle.num_classes, epochs=cfg.train.epochs)
    model = method.prepare_model(model)
    _check_placement(cfg, model, train, device)
    if cfg.data.on_device:
        train = train.to(device)
    _dry_forward(model, test.batch([0, 1])[0] if len(test) > 1 else test.batch([0])[0], augment, cfg)
    layout = cfg.train.channels_last
    channels_last = layout == "on" or (layout == "auto" and bundle.image_size >= 16)
    amp = cfg.train.amp
    amp_dtype = torch.bfloat16 if amp == "bf16" or (amp == "auto" and device.type == "cuda") else None
    info = {"dataset": bundle.name, "classes": list(bundle.classes), "num_classes": bundle.num_classes,
            "in_channels": bundle.channels, "image_size": bundle.image_size, "mean": list(bundle.mean),
            "std": list(bundle.std)}
    return Setup(cfg, device, train, test, clean, bundle.num_classes, augment, policies, mixer, model,
                 method, channels_last, amp_dtype, info)


def _splits(cfg: Config, bundle: DataBundle) -> tuple[Any, Any, torch.Tensor]:
    """The training set (label noise on the subset load_dataset drew), the test set and the clean training labels."""
    train, test = bundle.train, bundle.test
    clean = train.labels.clone()
    noise = cfg.data.noise
    if noise.kind != "none" and noise.rate > 0:
        noisy = apply_label_noise(clean, bundle.num_classes, noise.kind, noise.rate, noise.seed, classes=bundle.classes)
        train = train.with_labels(noisy)
    return train, test, clean


def _augmentation(aug: AugmentCfg, bundle: DataBundle) -> tuple[BatchAugment, list[Policy]]:
    """Crop, flip and normalisation (the data set's defaults where unset), and the uint8 policies before them."""
    augment = BatchAugment(
        crop_padding=bundle.default_augment["crop_padding"] if aug.crop_padding is None else aug.crop_padding,
        flip=bundle.default_augment["flip"] if aug.flip is None else aug.flip,
        mean=bundle.mean, std=bundle.std,
    )
    fill = [round(255 * m) for m in bundle.mean] if aug.fill == "mean" else 0
    policies = []
    if aug.policy != "none":
        kwargs = {"num_ops": aug.randaugment_ops, "magnitude": aug.randaugment_magnitude} if aug.policy == "randaugment" else {}
        policies.append(build_policy(aug.policy, fill=fill, **kwargs))
    if aug.cutout:
        policies.append(build_policy("cutout", size=aug.cutout, fill=fill))
    return augment, policies


def _check_placement(cfg: Config, model: nn.Module, train: Any, device: torch.device) -> None:
    """Ranks, SyncBatchNorm and data.on_device against what the model, data and device allow."""
    world = distributed.world_size()
    if world > 1 and len(train) < world * cfg.optim.batch_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} per rank x {world} ranks = {world * cfg.optim.batch_size} "
                          f"samples per step, but the training set has {len(train)}: lower the batch size or the rank count")
    if cfg.train.sync_bn and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(f"train.sync_bn = true: model.name={cfg.model.name} has no BatchNorm layer to synchronise")
    if cfg.data.on_device:
        if device.type != "cuda":
            raise ConfigError("data.on_device = true needs a CUDA device (train.device=cuda or auto on a GPU machine)")
        if not isinstance(train, ArrayDataset):
            raise ConfigError("data.on_device = true needs an in-memory data set (not data.stream)")


@torch.no_grad()
def _dry_forward(model: nn.Module, images: torch.Tensor, augment: BatchAugment, cfg: Config) -> None:
    """Two test images through the model in eval mode (no state changes, no RNG draws): a model that
    cannot take the data fails here, before anything is written."""
    was = model.training
    model.eval()
    try:
        x = augment.normalize(images)
        forward_exits = getattr(model, "forward_exits", None)
        z = forward_exits(x)[-1] if forward_exits is not None else model(x)
    except (RuntimeError, ValueError, IndexError) as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)[:160]
        c, h, w = images.shape[1:]
        raise ConfigError(f"model.name={cfg.model.name} cannot take {cfg.data.name} images of {c}x{h}x{w} "
                          f"({first}); choose another model or resize with data.image_size (--image-size)") from None
    finally:
        model.train(was)
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != len(images):
        raise ConfigError(f"model.name={cfg.model.name}: expected (N, classes) logits on {cfg.data.name}, "
                          f"got {tuple(getattr(z, 'shape', ()))}")
