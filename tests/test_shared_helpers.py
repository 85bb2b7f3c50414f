"""The helpers every layer shares (issue 17): unwrap() through the trainer's wrappers, the one atomic
writer (fsync, used by the data cache and the run files alike), the config schemas' section lists."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from selfkd.atomic import atomic_write
from selfkd.nn_utils import DynamicBatch, unwrap


def test_unwrap_reaches_the_eager_module_through_every_wrapper():
    model = nn.Linear(3, 2)
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(model)) is model
    assert unwrap(torch.compile(model)) is model
    assert unwrap(DynamicBatch(torch.compile(nn.DataParallel(model)))) is model  # the trainer's nesting
    assert not hasattr(DynamicBatch(torch.compile(model)), "_orig_mod")  # torch's private name is torch's only


def test_atomic_write_fsyncs_before_the_rename_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    path = tmp_path / "sub" / "x.bin"
    atomic_write(path, lambda f: f.write(b"abc"))
    assert path.read_bytes() == b"abc" and len(synced) == 1 and synced[0] != str(path)  # the temp file, before the rename

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, boom)
    assert path.read_bytes() == b"abc" and sorted(p.name for p in path.parent.iterdir()) == ["x.bin"]


def test_the_decoded_image_cache_is_written_by_the_one_atomic_writer(tmp_path, monkeypatch):
    from selfkd.data import imagefolder

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    d = {k: np.zeros((1, 3, 2, 2) if k.endswith("images") else (1,), dtype=np.uint8 if k.endswith("images") else np.int64)
         for k in ("train_images", "train_labels", "test_images", "test_labels")}
    path = tmp_path / "cache.npz"
    imagefolder._save_cache(path, d)
    assert len(synced) == 1 and path.is_file()
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("command,schema", [("train", "selfkd.engine.config:Config"),
                                            ("finetune", "selfkd.integrations.finetune_config:FinetuneConfig")])
def test_cli_help_lists_the_schemas_sections(command, schema):
    import importlib

    mod, name = schema.split(":")
    sections = getattr(importlib.import_module(mod), name).sections()
    out = subprocess.run([sys.executable, "-m", "selfkd", command, "--help"], capture_output=True, text=True,
                         check=True, env=dict(os.environ, COLUMNS="400")).stdout
    assert f"(sections: {', '.join(sections)})" in " ".join(out.split())
