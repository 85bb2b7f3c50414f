"""Test-only plugin (``selfkd --import killsave finetune ...``): SIGKILL this process at one point of
a checkpoint save, named by ``SELFKD_KILL_AT=POINT:N`` (the N-th time the point is reached). It wraps
the functions the save calls and changes nothing else:

* ``weights``: half-way through writing a ``model.safetensors`` (the first N-1 are written whole);
* ``trainer_state``: right after ``trainer_state.json`` is written (the method state is not yet);
* ``method``: right after ``selfkd_method.pt`` is written (the folder is not renamed yet);
* ``rotate``: when the older checkpoints are about to be deleted (the new one is in place; the
  Trainer's own rotation call inside the staging folder does not count).
"""
import os
import signal

import selfkd.engine.checkpoint as ckpt
import transformers
import transformers.modeling_utils as modeling
import transformers.trainer_utils as trainer_utils
from safetensors.torch import save as safetensors_bytes

point, _, nth = os.environ.get("SELFKD_KILL_AT", "").partition(":")  # unset: a resume re-importing it (recorded in config.yaml)
nth = int(nth or 1)
seen = {"n": 0}


def reached(name: str) -> bool:
    if name != point:
        return False
    seen["n"] += 1
    return seen["n"] == nth


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


real_save_file = modeling.safe_save_file


def save_file(tensors, filename, metadata=None):
    if reached("weights"):
        data = safetensors_bytes(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        die()
    return real_save_file(tensors, filename, metadata=metadata)


real_to_json = transformers.TrainerState.save_to_json


def save_to_json(self, json_path):
    real_to_json(self, json_path)
    if reached("trainer_state"):
        die()


real_ckpt_save = ckpt.save


def method_save(path, state):
    real_ckpt_save(path, state)
    if str(path).endswith("selfkd_method.pt") and reached("method"):
        die()


real_rotate = trainer_utils.rotate_checkpoints


def rotate(*args, **kwargs):
    staged = str(kwargs.get("output_dir", "")).endswith(".selfkd-saving")  # the Trainer's own call, inside the stage
    if not staged and reached("rotate"):
        die()
    return real_rotate(*args, **kwargs)


modeling.safe_save_file = save_file
transformers.TrainerState.save_to_json = save_to_json
ckpt.save = method_save
trainer_utils.rotate_checkpoints = rotate
