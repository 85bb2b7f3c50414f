"""Command line: ``selfkd train | finetune | sweep | report | export | demo | methods | models | presets``.

Errors a user can fix print one line (``selfkd: error: ...``) and exit 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SelfKDError

EXIT_USER = 2


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (sections: data, augment, model, method, optim, schedule, train)")
    p.add_argument("--preset", metavar="NAME", help="a named recipe (see `selfkd presets`), applied below --config")
    p.add_argument("--data", metavar="NAME", help="digits | cifar10 | cifar100 | imagefolder")
    p.add_argument("--data-dir", metavar="DIR", help="where the data set lives (or a .tar.gz for imagefolder)")
    p.add_argument("--download", action="store_true", default=None, help="fetch CIFAR from its canonical address (md5-checked)")
    p.add_argument("--model", metavar="NAME", help="see `selfkd models`")
    _run_args(p, "see `selfkd methods`", "method.temperature=4")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where its last checkpoint left off")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")


def _run_args(p: argparse.ArgumentParser, method_help: str, example: str) -> None:
    """The options ``train`` and ``finetune`` share."""
    p.add_argument("--method", metavar="NAME", help=method_help)
    p.add_argument("--epochs", type=int, metavar="N")
    p.add_argument("--seed", type=int, metavar="S")
    p.add_argument("--batch-size", type=int, metavar="B", help="new samples per step")
    p.add_argument("--lr", type=float)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override any config key, e.g. --set {example} (repeatable)")
    p.add_argument("--out", metavar="RUN_DIR", help="a new run directory")


def _flags(a: argparse.Namespace) -> dict[str, Any]:
    table = {
        "data": ("data", "name"), "data_dir": ("data", "dir"), "download": ("data", "download"),
        "model": ("model", "name"), "method": ("method", "name"), "epochs": ("train", "epochs"),
        "seed": ("train", "seed"), "batch_size": ("optim", "batch_size"), "lr": ("optim", "lr"),
        "device": ("train", "device"), "compile": ("train", "compile"),
    }
    return _flag_tree(a, table)


def _flag_tree(a: argparse.Namespace, table: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The flags that were given, as a config layer: ``{section: {key: value}}``."""
    out: dict[str, Any] = {}
    for attr, (section, key) in table.items():
        value = getattr(a, attr)
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def _is_run_dir(path: Path) -> bool:
    from ..engine.trainer import CHECKPOINT, CONFIG

    return (path / CONFIG).exists() or (path / CHECKPOINT).exists()


def _threads(a: argparse.Namespace) -> None:
    if a.threads is not None:
        if a.threads < 1:
            raise ConfigError(f"--threads {a.threads}: expected a positive number of threads")
        import torch

        torch.set_num_threads(a.threads)


def _run_target(a: argparse.Namespace, given: list[str], command: str) -> tuple[Path, dict[str, Any] | None]:
    """The run directory, and its saved config with ``--resume`` (None: a new run), after the checks
    that keep a run directory safe: --resume takes nothing else, --out must not hold a run."""
    from ..engine import config as C
    from ..engine.trainer import CONFIG

    if a.resume:
        given = given + [flag for flag, on in (("--config", a.config), ("--preset", getattr(a, "preset", None)),
                                               ("--set", a.overrides), ("--out", a.out)) if on]
        if given:
            raise ConfigError(f"--resume uses the run's own {CONFIG}; drop the other options ({', '.join(given)})")
        run = Path(a.resume)
        if not (run / CONFIG).is_file():
            raise ConfigError(f"--resume {run}: no {CONFIG} there (not a run directory)")
        raw = C.load_yaml(run / CONFIG)
        kind = "finetune" if raw.get("kind") == "finetune" else "train"
        if kind != command:
            raise ConfigError(f"--resume {run}: a {kind} run; resume it with selfkd {kind} --resume {run}")
        return run, raw
    if not a.out:
        raise ConfigError(f"{command}: --out RUN_DIR is required (or --resume RUN_DIR)")
    run = Path(a.out)
    if run.exists() and (not run.is_dir() or _is_run_dir(run)):
        raise ConfigError(f"--out {run}: already holds a run; use --resume {run} or choose another directory")
    return run, None


def _finished(run: Path) -> bool:
    from ..engine.trainer import SUMMARY

    if (run / SUMMARY).exists():
        print(f"{run}: already finished ({SUMMARY} exists); nothing to do")
        return True
    return False


def cmd_train(a: argparse.Namespace) -> int:
    from ..engine import config as C
    from ..engine.trainer import CONFIG, train_run

    _threads(a)
    progress = False if a.no_progress else None
    run, raw = _run_target(a, [k for k, v in _flags(a).items() if v], "train")
    if raw is not None:
        cfg = C.build_config(raw, source=str(run / CONFIG))
        if _finished(run):
            return 0
        summary = train_run(cfg, run, resume=True, progress=progress)
    else:
        cfg = C.resolve(preset=a.preset, file=a.config, flags=_flags(a), overrides=a.overrides)
        summary = train_run(cfg, run, progress=progress)
    print(f"{run}: last acc {summary['last_acc']:.2f} | best acc {summary['best_acc']:.2f} (epoch {summary['best_epoch']})"
          f" | ece {summary['ece']:.4f} | nll {summary['nll']:.4f} | {summary['seconds']:.1f}s")
    return 0


def _finetune_flags(a: argparse.Namespace) -> dict[str, Any]:
    return _flag_tree(a, {
        "data": ("data", "path"), "model": ("model", "path"), "method": ("method", "name"),
        "epochs": ("train", "epochs"), "seed": ("train", "seed"), "batch_size": ("optim", "batch_size"),
        "lr": ("optim", "lr"), "device": ("train", "device"),
    })


def cmd_finetune(a: argparse.Namespace) -> int:
    from ..engine.finetune_config import build_finetune_config, resolve_finetune
    from ..engine.trainer import CONFIG

    _threads(a)
    run, raw = _run_target(a, list(_finetune_flags(a)), "finetune")
    if raw is not None:
        cfg = build_finetune_config(raw, source=str(run / CONFIG))
        if _finished(run):
            return 0
    else:
        cfg = resolve_finetune(file=a.config, flags=_finetune_flags(a), overrides=a.overrides)
    from ..integrations.finetune import finetune_run  # transformers: imported only for this command

    s = finetune_run(cfg, run, resume=raw is not None)
    print(f"{run}: last acc {s['last_acc']:.2f} | best acc {s['best_acc']:.2f} (epoch {s['best_epoch']}) | macro-F1 "
          f"{s['macro_f1']:.2f} | ece {s['ece']:.4f} | nll {s['nll']:.4f} | {s['seconds']:.1f}s")
    return 0


def recipes() -> dict[str, Any]:
    """The sweep files shipped as package data (``selfkd/recipes/NAME.yaml``)."""
    from importlib import resources

    return {f.name[:-5]: f for f in resources.files("selfkd").joinpath("recipes").iterdir() if f.name.endswith(".yaml")}


def _recipe(a: argparse.Namespace) -> None:
    """``--recipe NAME``: the packaged file, its runs under ./runs/NAME unless --out."""
    if (a.file is None) == (a.recipe is None):
        raise ConfigError("sweep: give a SWEEP_FILE or --recipe NAME (one of them)")
    if a.recipe is not None:
        known = recipes()
        if a.recipe not in known:
            raise ConfigError(f"--recipe {a.recipe}: unknown; known: {', '.join(sorted(known))}")
        a.file = str(known[a.recipe])
        a.out = a.out or str(Path("runs") / a.recipe)


def cmd_sweep(a: argparse.Namespace) -> int:
    from ..engine.sweep import run_sweep

    _recipe(a)

    _threads(a)
    if a.jobs is not None and not a.plan:
        from ..engine.sweep import run_jobs

        result = run_jobs(a.file, a.jobs, threads=a.threads, out=a.out)
        return 1 if result["failed"] else 0
    result = run_sweep(a.file, only_plan=a.plan, progress=False if a.no_progress else None, out=a.out,
                       log=print if a.plan else None)
    return 1 if result["failed"] else 0  # some runs failed (see RUN/failed.json); the rest ran


def cmd_report(a: argparse.Namespace) -> int:
    from ..engine.report import build_report

    build_report(a.dirs, out=a.out, baseline=a.baseline)
    print(Path(a.out or Path(a.dirs[0]) / "report") / "report.md")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_run

    meta = export_run(a.run, a.format, a.out, weights=a.weights)
    print(f"{a.out}: {a.format}, {meta['model']} ({meta['weights']} weights, epoch {meta['epoch']}), "
          f"{meta['num_classes']} classes, {meta['in_channels']}x{meta['image_size']}x{meta['image_size']} input")
    return 0


def cmd_methods(a: argparse.Namespace) -> int:
    from ..methods import available_methods, method_class

    names = a.names or available_methods()
    for name in names:
        cls = method_class(name)
        print(f"{name}: {cls.formula}")
        for key, field in cls.Params.model_fields.items():
            print(f"    {key} = {field.default!r}  {field.description or ''}".rstrip())
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from ..models import available_models

    print("\n".join(available_models()))
    return 0


def cmd_presets(a: argparse.Namespace) -> int:
    import yaml

    from ..engine.config import presets

    for name, body in presets().items():
        print(f"{name}:\n" + "".join(f"  {line}\n" for line in yaml.safe_dump(body, sort_keys=False).splitlines()))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=a.out, epochs=a.epochs, seed=a.seed, progress=False if a.no_progress else None)


def parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="selfkd", description="Self-knowledge distillation: DLB and its family.")
    p.add_argument("--version", action="version", version=f"selfkd {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module first (its @selfkd.register_model / register_method run); repeatable")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    imports = argparse.ArgumentParser(add_help=False)  # also accepted before the command
    imports.add_argument("--import", dest="imports", action="append", default=argparse.SUPPRESS, metavar="MODULE",
                         help="import a module first (its @selfkd.register_model / register_method run); repeatable")
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, metavar="N",
                         help="CPU threads per process (default: torch's choice, usually one per core)")
    t = sub.add_parser("train", help="train one run", parents=[common, threads, imports])
    _train_args(t)
    t.set_defaults(func=cmd_train)
    f = sub.add_parser("finetune", help="fine-tune a local Hugging Face model on labelled text (pip install selfkd[hf])",
                       parents=[common, threads, imports])
    f.add_argument("--config", metavar="FILE", help="YAML config (sections: data, model, method, optim, train)")
    f.add_argument("--data", metavar="PATH", help="a folder of class folders of .txt files, or a .csv/.tsv/.jsonl file")
    f.add_argument("--model", metavar="DIR", help="a local Hugging Face model folder (with its tokenizer)")
    _run_args(f, "ce, ls, dlb, ... (methods computed from the logits)", "method.schedule=entropy")
    f.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last epoch's checkpoint")
    f.set_defaults(func=cmd_finetune)
    w = sub.add_parser("sweep", help="run a grid of configs from a sweep file (skips finished runs, resumes the rest)",
                       parents=[common, threads, imports])
    w.add_argument("file", metavar="SWEEP_FILE", nargs="?", help="YAML: out, preset, base, grid, variants, import")
    w.add_argument("--recipe", metavar="NAME", help="a sweep shipped with selfkd instead of a file: "
                   + ", ".join(sorted(recipes())) + " (runs in ./runs/NAME unless --out)")
    w.add_argument("--plan", action="store_true", help="list the runs and their status; run nothing, write nothing")
    w.add_argument("--out", metavar="DIR", help="root of the run directories (default: the file's `out`, "
                                                "relative to the file's folder)")
    w.add_argument("--no-progress", action="store_true", help="plain lines even on a terminal")
    w.add_argument("--jobs", type=int, metavar="N", help="train N runs at once in N processes (each with "
                   "cores/N threads unless --threads); plain lines prefixed [job k]")
    w.set_defaults(func=cmd_sweep)
    r = sub.add_parser("report", help="tables and plots (mean ± std over seeds) from run directories", parents=[common])
    r.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or folders holding them (searched recursively)")
    r.add_argument("--out", metavar="REPORT_DIR", help="where report.md and the plots go (default: FIRST_DIR/report)")
    r.add_argument("--baseline", metavar="GROUP", help="a group label (e.g. 'method=ce'): add each group's "
                   "differences to it, paired by seed")
    r.set_defaults(func=cmd_report)
    d = sub.add_parser("demo", help="CE vs DLB on digits, clean and 40%% symmetric noise", parents=[common])
    d.add_argument("--out", metavar="DIR", help="keep the runs here (default: a temporary directory)")
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("export", help="write a run's weights for deployment (safetensors or TorchScript)",
                       parents=[common, imports])
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("--format", required=True, choices=["safetensors", "torchscript"])
    e.add_argument("--out", required=True, metavar="FILE", help="a new file")
    e.add_argument("--weights", choices=["best", "last"], default="best", help="best epoch (default) or last checkpoint")
    e.set_defaults(func=cmd_export)
    m = sub.add_parser("methods", help="list methods, their hyper-parameters and formulas", parents=[imports])
    m.add_argument("names", nargs="*")
    m.set_defaults(func=cmd_methods)
    sub.add_parser("models", help="list model names", parents=[imports]).set_defaults(func=cmd_models)
    sub.add_parser("presets", help="list named recipes").set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.imports:
            from ..plugins import import_modules

            import_modules(args.imports)
        return args.func(args)
    except SelfKDError as err:
        if args.debug:
            raise
        print(f"selfkd: error: {err}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("selfkd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `selfkd methods | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
