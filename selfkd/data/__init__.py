"""Data sets held in memory as uint8 tensors, batched augmentation on the device, and label noise.

    from selfkd.data import load_dataset, BatchAugment
    bundle = load_dataset("cifar10", root="data", download=True)
    augment = BatchAugment(**bundle.default_augment, mean=bundle.mean, std=bundle.std)
    for x, y, idx in DataLoader(bundle.train, batch_size=128, shuffle=True):
        x = augment(x.to(device), generator)   # float32, normalised

Importing this package has no side effects: no environment reads, no network, no terminal probes.
"""
from .augment import BatchAugment
from .cifar import SOURCES, download_cifar
from .dataset import ArrayDataset, BatchView, DataBundle
from .loaders import KNOWN_DATASETS, load_dataset
from .mixing import MIXERS, Mix, MixBlocks, Mixer, build_mixer, cutmix, mix_rows, mixup, remix, sample_beta
from .noise import NOISE_KINDS, apply_label_noise
from .policies import POLICIES, AutoAugment, Cutout, RandAugment, TrivialAugment, build_policy

__all__ = [
    "ArrayDataset", "AutoAugment", "BatchView", "BatchAugment", "Cutout", "DataBundle", "KNOWN_DATASETS", "MIXERS", "Mix",
    "Mixer", "NOISE_KINDS", "POLICIES", "RandAugment", "SOURCES", "TrivialAugment", "apply_label_noise",
    "build_mixer", "build_policy", "cutmix", "download_cifar", "load_dataset", "mixup", "sample_beta", "MixBlocks",
    "mix_rows", "remix",
]
