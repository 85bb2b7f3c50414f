"""``selfkd export RUN_DIR --format export|safetensors|torchscript --out FILE``: a run's weights for deployment.

The file holds the best epoch's weights (``best.pt``; ``--weights last``: the last checkpoint's) and, as
metadata, what inference needs: the model name, the class names in label order, and the
preprocessing: ``image_size``, ``in_channels``, per-channel ``mean``/``std`` in [0, 1] units (inputs are
``(x / 255 − mean) / std``, NCHW). Where the metadata lives:

* ``export`` (recommended): a ``torch.export`` ExportedProgram (``torch.export.save``, a ``.pt2`` zip) of
  the eval-mode model, normalised ``[N, C, H, W]`` batch -> logits, ``N`` dynamic; the metadata is the
  extra file ``selfkd.json`` (``torch.export.load(f, extra_files={"selfkd.json": ""})``).
* ``safetensors``: the state dict; the metadata in the header, string-valued (lists as JSON); the model is
  rebuilt with ``selfkd.build_model(model, num_classes, in_channels)`` (then the method's
  ``prepare_model`` for methods that wrap it, e.g. BYOT's exits).
* ``torchscript``: a traced eval-mode module (as ``export``, batch size free), the metadata in the extra
  file ``selfkd.json``. torch deprecates TorchScript; selfkd's own calls silence its warnings.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _info(run: Path, cfg: Any) -> dict[str, Any]:
    from ..engine.rundir import DATA_INFO
    from ..engine.setup import build

    f = run / DATA_INFO
    if f.is_file():
        return json.loads(f.read_text())
    return build(cfg).data_info  # a run from before data.json: load its data set once


def export_run(run_dir: str, fmt: str, out: str, weights: str = "best") -> dict[str, Any]:
    import torch

    from ..engine import checkpoint as ckpt
    from ..engine import config as C
    from ..engine.rundir import BEST, CHECKPOINT, CONFIG
    from ..methods import build_method
    from ..models import build_model

    run, dest = Path(run_dir), Path(out)
    if not (run / CONFIG).is_file():
        raise ConfigError(f"export {run}: no {CONFIG} there (not a run directory)")
    if dest.is_symlink() and not dest.exists():
        raise ConfigError(f"export --out {dest}: a dangling symbolic link; remove it or choose another file")
    if dest.exists():
        raise ConfigError(f"export --out {dest}: already exists; choose another file")
    src = run / (BEST if weights == "best" else CHECKPOINT)
    if not src.is_file():
        raise ConfigError(f"export {run}: no {src.name} yet (the run has not finished an epoch)")
    if fmt == "safetensors":
        from ..plugins import require

        require("safetensors", "export")
    from ..plugins import import_recorded

    raw = C.load_yaml(run / CONFIG)
    import_recorded(raw, str(run / CONFIG))  # a plugin model or method the run was trained with
    cfg = C.build_config(raw, source=str(run / CONFIG))
    info = _info(run, cfg)
    state = ckpt.load(src)
    model = build_model(cfg.model.name, num_classes=info["num_classes"], in_channels=info["in_channels"])
    if set(state["model"]) != set(model.state_dict()):  # the method wrapped the model (BYOT's exits)
        model = build_method(cfg.method.name, **cfg.method.params()).prepare_model(model)
    model.load_state_dict(state["model"])
    model.eval()
    meta = {"model": cfg.model.name, "method": cfg.method.name, "weights": weights, "epoch": int(state["epoch"]),
            "dataset": info["dataset"], "classes": info["classes"], "num_classes": info["num_classes"],
            "in_channels": info["in_channels"], "image_size": info["image_size"], "mean": info["mean"],
            "std": info["std"], "input": "(x / 255 - mean) / std, NCHW float32"}
    if fmt == "safetensors":
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        data = save(tensors, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    elif fmt == "export":
        data = _exported(model, info, json.dumps(meta))
    else:
        x = torch.zeros(1, info["in_channels"], info["image_size"], info["image_size"])
        with warnings.catch_warnings():  # torch >= 2.9 deprecates torch.jit; the format is still asked for
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            with torch.no_grad():
                traced = torch.jit.trace(model, x, check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf, _extra_files={"selfkd.json": json.dumps(meta)})
        data = buf.getvalue()
    ckpt.write_new(dest, data)  # exclusive: a file another export wrote meanwhile is never replaced
    return meta


def _exported(model: Any, info: dict[str, Any], meta: str) -> bytes:
    """``torch.export`` of the eval-mode model with a dynamic batch dimension, saved with ``selfkd.json``."""
    import torch

    x = torch.zeros(2, info["in_channels"], info["image_size"], info["image_size"])  # 2: batch 1 would specialise
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"selfkd.json": meta})
    return buf.getvalue()
