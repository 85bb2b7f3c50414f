"""Command line: ``selfkd train | pack | finetune | sweep | report | export | eval | demo | methods | models | presets``.

Errors a user can fix print one line (``selfkd: error: ...``) and exit 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError, SelfKDError

EXIT_USER = 2


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER, f"selfkd: error: {message} (see `{self.prog} --help`)\n")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (sections: data, augment, model, method, optim, schedule, train)")
    p.add_argument("--preset", metavar="NAME", help="a named recipe (see `selfkd presets`), applied below --config")
    p.add_argument("--data", metavar="NAME", help="digits | cifar10 | cifar100 | imagefolder | packed (a folder from `selfkd pack`)")
    p.add_argument("--data-dir", metavar="DIR", help="where the data set lives (or a .tar.gz for imagefolder)")
    p.add_argument("--download", action="store_true", default=None, help="fetch CIFAR from its canonical address (md5-checked)")
    p.add_argument("--model", metavar="NAME", help="see `selfkd models`")
    p.add_argument("--method", metavar="NAME", help="see `selfkd methods`")
    p.add_argument("--epochs", type=int, metavar="N")
    p.add_argument("--seed", type=int, metavar="S")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="new samples per step, per rank under torchrun / --nproc (global batch = B x ranks)")
    p.add_argument("--lr", type=float)
    p.add_argument("--image-size", type=int, metavar="PX", help="resize images to PX x PX (data.image_size)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set method.temperature=4 (repeatable)")
    p.add_argument("--out", metavar="RUN_DIR", help="a new run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where its last checkpoint left off")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (DistributedDataParallel: gloo on CPU, nccl on CUDA), "
                   "as torchrun does in its standalone mode with N processes per node; only rank 0 writes")


# flag attribute -> (flag, config section, key); None: not a config key
FLAGS: dict[str, tuple[str, str | None, str | None]] = {
    "data": ("--data", "data", "name"), "data_dir": ("--data-dir", "data", "dir"),
    "download": ("--download", "data", "download"), "image_size": ("--image-size", "data", "image_size"),
    "model": ("--model", "model", "name"), "method": ("--method", "method", "name"),
    "epochs": ("--epochs", "train", "epochs"), "seed": ("--seed", "train", "seed"),
    "batch_size": ("--batch-size", "optim", "batch_size"), "lr": ("--lr", "optim", "lr"),
    "device": ("--device", "train", "device"), "compile": ("--compile", "train", "compile"),
    "config": ("--config", None, None), "preset": ("--preset", None, None), "overrides": ("--set", None, None),
    "out": ("--out", None, None), "nproc": ("--nproc", None, None),
}


# the same for `selfkd finetune`
FINETUNE_FLAGS: dict[str, tuple[str, str | None, str | None]] = {
    "data": ("--data", "data", "path"), "model": ("--model", "model", "path"), "method": ("--method", "method", "name"),
    "epochs": ("--epochs", "train", "epochs"), "seed": ("--seed", "train", "seed"),
    "batch_size": ("--batch-size", "optim", "batch_size"), "lr": ("--lr", "optim", "lr"),
    "device": ("--device", "train", "device"), "config": ("--config", None, None),
    "overrides": ("--set", None, None), "out": ("--out", None, None),
}


def _flags(a: argparse.Namespace, table: dict[str, tuple[str, str | None, str | None]] = FLAGS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, (_, section, key) in table.items():
        value = getattr(a, attr)
        if section is not None and value is not None:
            out.setdefault(section, {})[key] = value
    if getattr(a, "recorded", None):  # --import: recorded in RUN/config.yaml
        out["imports"] = list(a.recorded)
    return out


def _given(a: argparse.Namespace, table: dict[str, tuple[str, str | None, str | None]] = FLAGS) -> list[str]:
    """The flags given on the command line, as the user typed them."""
    return [flag for attr, (flag, _, _) in table.items() if getattr(a, attr) not in (None, [], False)]


def _saved_config(run: Path, command: str) -> dict[str, Any]:
    """``--resume RUN``: the run's own config.yaml, written by ``command`` (train or finetune)."""
    from ..engine import config as C
    from ..engine.rundir import CONFIG

    if not (run / CONFIG).is_file():
        raise ConfigError(f"--resume {run}: no {CONFIG} there (not a run directory)")
    raw = C.load_yaml(run / CONFIG)
    kind = "finetune" if raw.get("kind") == "finetune" else "train"
    if kind != command:
        raise ConfigError(f"--resume {run}: a {kind} run; resume it with selfkd {kind} --resume {run}")
    from ..plugins import import_recorded

    import_recorded(raw, str(run / CONFIG))
    return raw


def _resumed(a: argparse.Namespace, command: str, table: dict[str, tuple[str, str | None, str | None]],
             build: Any) -> tuple[Path, Any]:
    """``--resume RUN``: the run and its own config (no other option may be given); the config is None when
    the run has finished already (said once, by rank 0)."""
    from .. import distributed
    from ..engine.rundir import CONFIG, SUMMARY

    given = _given(a, table)
    if given:
        raise ConfigError(f"--resume uses the run's own {CONFIG}; drop the other options ({', '.join(given)})")
    run = Path(a.resume)
    cfg = build(_saved_config(run, command), source=str(run / CONFIG))
    if (run / SUMMARY).exists():
        if distributed.env_ranks()[0] == 0:
            print(f"{run}: already finished ({SUMMARY} exists); nothing to do")
        return run, None
    return run, cfg


def _check_threads(a: argparse.Namespace) -> None:
    if a.threads is not None and a.threads < 1:
        raise ConfigError(f"--threads {a.threads}: expected a positive number of threads")


def cmd_train(a: argparse.Namespace) -> int:
    import os

    if a.nproc is not None:
        return _launch(a)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # started by torchrun (or --nproc)
        return _train_distributed(a)
    return _train(a)


def _launch(a: argparse.Namespace) -> int:
    """``--nproc N``: N copies of this command, one per rank, with torchrun's environment (one node,
    127.0.0.1, a free port). The first rank to fail stops the others; its exit status is returned (128 + N
    for signal N, which the launcher reports in one line: cli/_ranks.py)."""
    import os
    import signal
    import socket
    import subprocess
    import time

    n = a.nproc
    if n < 1:
        raise ConfigError(f"--nproc {n}: expected a positive number of processes")
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc: this process was started by torchrun already (WORLD_SIZE is set); drop --nproc")
    argv = list(a.argv)
    i = argv.index("--nproc") if "--nproc" in argv else next(k for k, v in enumerate(argv) if v.startswith("--nproc="))
    del argv[i : i + (1 if argv[i].startswith("--nproc=") else 2)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def die_with_parent() -> None:  # a killed launcher takes its ranks along (Linux)
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    from ._ranks import NPROC_ENV, launcher_report

    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{NPROC_ENV: str(n)})
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: one thread per rank unless told otherwise
        procs.append(subprocess.Popen([sys.executable, "-m", "selfkd", *argv], env=env, preexec_fn=die_with_parent))
    codes: list[int | None] = [None] * n
    order: list[int] = []  # the failed ranks, in the order their exits were seen
    failed_at = None
    try:
        while any(c is None for c in codes):
            for r, p in enumerate(procs):
                if codes[r] is None:
                    codes[r] = p.poll()
                    if codes[r] not in (None, 0):
                        order.append(r)
                        failed_at = failed_at or time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 10:  # the rest hang in a collective
                for r, p in enumerate(procs):
                    if codes[r] is None:
                        p.kill()
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        return 130
    return launcher_report(a, [int(c or 0) for c in codes], order)  # one line for a rank killed by a signal


def _train_distributed(a: argparse.Namespace) -> int:
    """One rank of a torchrun run: the config is resolved on every rank, then the process group starts."""
    import os

    from .. import distributed
    from ..engine import config as C
    from ..engine.setup import select_device

    _check_threads(a)
    if a.resume:
        _, cfg = _resumed(a, "train", FLAGS, C.build_config)
        if cfg is None:
            return 0
    else:
        if not a.out:
            raise ConfigError("train: --out RUN_DIR is required (or --resume RUN_DIR)")
        cfg = C.resolve(preset=a.preset, file=a.config, flags=_flags(a), overrides=a.overrides)
    device = select_device(cfg.train.device)
    distributed.pick_backend(cfg.train.backend, device)  # NCCL without CUDA: one line, before any rendezvous
    distributed.init(device, cfg.train.backend)
    from ._ranks import NPROC_ENV, record

    if not os.environ.get(NPROC_ENV):  # torchrun's agent SIGTERMs the survivors as soon as one rank ends
        distributed.stop_on_sigterm()
    ok = False
    try:
        code = _train(a, cfg)
        ok = True
        return code
    except (Exception, KeyboardInterrupt) as err:
        record(err)  # before the sockets close: the peers that see them close read what happened
        raise
    finally:
        distributed.stop_on_sigterm(False)
        distributed.shutdown(synced=ok)


def _train(a: argparse.Namespace, resolved: Any = None) -> int:
    from .. import distributed
    from ..engine import config as C
    from ..engine import rundir
    from ..engine.stages import train_run

    _check_threads(a)
    progress = False if a.no_progress else None
    if a.resume:
        run, cfg = (Path(a.resume), resolved) if resolved is not None else _resumed(a, "train", FLAGS, C.build_config)
        if cfg is None:
            return 0
        summary = train_run(cfg, run, resume=True, progress=progress, threads=a.threads)
    else:
        if not a.out:
            raise ConfigError("train: --out RUN_DIR is required (or --resume RUN_DIR)")
        run = Path(a.out)
        if resolved is None:  # one process: cheap checks first, a bad --out fails before the config is read
            rundir.check_new(run)
            rundir.check_writable(run)
        cfg = resolved if resolved is not None else C.resolve(preset=a.preset, file=a.config, flags=_flags(a),
                                                              overrides=a.overrides)
        summary = train_run(cfg, run, progress=progress, threads=a.threads)
    if not distributed.is_main():
        return 0
    print(f"{run}: last acc {summary['last_acc']:.2f} | best acc {summary['best_acc']:.2f} (epoch {summary['best_epoch']})"
          f" | ece {summary['ece']:.4f} | nll {summary['nll']:.4f} | {summary['seconds']:.1f}s")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from ..integrations.finetune_config import build_finetune_config, resolve_finetune

    _check_threads(a)
    if a.resume:
        run, cfg = _resumed(a, "finetune", FINETUNE_FLAGS, build_finetune_config)
        if cfg is None:
            return 0
    else:
        if not a.out:
            raise ConfigError("finetune: --out RUN_DIR is required (or --resume RUN_DIR)")
        run = Path(a.out)
        cfg = resolve_finetune(file=a.config, flags=_flags(a, FINETUNE_FLAGS), overrides=a.overrides)
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    from ..integrations.finetune import finetune_run  # transformers: imported only for this command

    s = finetune_run(cfg, run, resume=bool(a.resume))
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
    from ..experiments.sweep import run_sweep

    _recipe(a)
    _check_threads(a)
    if a.jobs is not None and not a.plan:
        from ..experiments.sweep import run_jobs

        result = run_jobs(a.file, a.jobs, threads=a.threads, out=a.out)
        return 1 if result["failed"] else 0
    if a.plan and a.threads is not None:
        raise ConfigError("--threads has no effect with --plan (nothing is trained)")
    result = run_sweep(a.file, only_plan=a.plan, progress=False if a.no_progress else None, out=a.out,
                       log=print if a.plan else None, threads=a.threads)
    return 1 if result["failed"] else 0  # some runs failed (see RUN/failed.json); the rest ran


def cmd_report(a: argparse.Namespace) -> int:
    from ..experiments.report import build_report

    build_report(a.dirs, out=a.out, baseline=a.baseline, plots=not a.no_plots)
    print(Path(a.out or Path(a.dirs[0]) / "report") / "report.md")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_run

    meta = export_run(a.run, a.format, a.out, weights=a.weights)
    print(f"{a.out}: {a.format}, {meta['model']} ({meta['weights']} weights, epoch {meta['epoch']}), "
          f"{meta['num_classes']} classes, {meta['in_channels']}x{meta['image_size']}x{meta['image_size']} input")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .eval import eval_run

    _check_threads(a)
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    r = eval_run(a.run, a.data, a.out, data_dir=a.data_dir, split=a.split, weights=a.weights, device=a.device,
                 batch_size=a.batch_size)
    top5 = f" | top5 {r['top5']:.2f}" if "top5" in r else ""
    f1 = f" | macro-F1 {r['macro_f1']:.2f}" if "macro_f1" in r else ""
    print(f"{a.out}: acc {r['acc']:.2f}{top5}{f1} | ece {r['ece']:.4f} | nll {r['nll']:.4f} | {r['count']} samples "
          f"({r['split']} of {r['data']}; {r['weights']} weights, epoch {r['epoch']})")
    return 0


def cmd_methods(a: argparse.Namespace) -> int:
    from .catalog import method_lines

    print("\n".join(method_lines(a.names)))
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from .catalog import model_names

    print("\n".join(model_names()))
    return 0


def cmd_presets(a: argparse.Namespace) -> int:
    import yaml

    from ..engine.presets import presets

    for name, body in presets().items():
        print(f"{name}:\n" + "".join(f"  {line}\n" for line in yaml.safe_dump(body, sort_keys=False).splitlines()))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_threads(a)
    return run_demo(out=a.out, epochs=a.epochs, seed=a.seed, progress=False if a.no_progress else None,
                    threads=a.threads)


def parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = _Parser(prog="selfkd", description="Self-knowledge distillation: DLB and its family.")
    p.add_argument("--version", action="version", version=f"selfkd {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module first (its @selfkd.register_model / register_method run); repeatable")
    sub = p.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    imports = _Parser(add_help=False)  # also accepted before the command
    imports.add_argument("--import", dest="imports", action="append", default=argparse.SUPPRESS, metavar="MODULE",
                         help="import a module first (its @selfkd.register_model / register_method run); repeatable")
    threads = _Parser(add_help=False)
    threads.add_argument("--threads", type=int, metavar="N",
                         help="CPU threads per process (default: torch's choice, usually one per core)")
    t = sub.add_parser("train", help="train one run", parents=[common, threads, imports])
    _train_args(t)
    t.set_defaults(func=cmd_train)
    from .pack import add_parser as _pack_parser

    _pack_parser(sub, [common])
    f = sub.add_parser("finetune", help="fine-tune a local Hugging Face model on labelled text (pip install selfkd[hf])",
                       parents=[common, threads, imports])
    f.add_argument("--config", metavar="FILE", help="YAML config (sections: data, model, method, optim, train)")
    f.add_argument("--data", metavar="PATH", help="a folder of class folders of .txt files, or a .csv/.tsv/.jsonl file")
    f.add_argument("--model", metavar="DIR", help="a local Hugging Face model folder (with its tokenizer)")
    f.add_argument("--method", metavar="NAME", help="ce, ls, dlb, ... (methods computed from the logits)")
    f.add_argument("--epochs", type=int, metavar="N")
    f.add_argument("--seed", type=int, metavar="S")
    f.add_argument("--batch-size", type=int, metavar="B", help="new documents per step (DLB adds the repeated ones)")
    f.add_argument("--lr", type=float)
    f.add_argument("--device", choices=["auto", "cpu", "cuda"])
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set method.schedule=entropy (repeatable)")
    f.add_argument("--out", metavar="RUN_DIR", help="a new run directory")
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
    r.add_argument("--baseline", metavar="GROUP", help="a group label, or some of its parts (e.g. 'method=ce'): "
                   "add each group's differences to it (at the same values of the other axes), paired by seed, "
                   "with 95%% intervals")
    r.add_argument("--no-plots", action="store_true", help="the tables alone: no PNG drawn (matplotlib unused)")
    r.set_defaults(func=cmd_report)
    d = sub.add_parser("demo", help="CE vs DLB on digits, clean and 40%% symmetric noise", parents=[common, threads])
    d.add_argument("--out", metavar="DIR", help="keep the runs here (default: a temporary directory)")
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("export", help="write a run's weights for deployment (torch.export .pt2, safetensors or "
                       "TorchScript)", parents=[common, imports])
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("--format", required=True, choices=["export", "safetensors", "torchscript"],
                   help="export: torch.export ExportedProgram (.pt2, dynamic batch; recommended)")
    e.add_argument("--out", required=True, metavar="FILE", help="a new file")
    e.add_argument("--weights", choices=["best", "last"], default="best", help="best epoch (default) or last checkpoint")
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("eval", help="score a run on a data set with the run's own preprocessing, into a JSON file",
                       parents=[common, threads, imports])
    v.add_argument("run", metavar="RUN_DIR", help="a train or finetune run directory")
    v.add_argument("--data", required=True, metavar="NAME|PATH", help="train runs: digits | cifar10 | cifar100 | "
                   "imagefolder | packed; finetune runs: a text folder or .csv/.tsv/.jsonl file")
    v.add_argument("--data-dir", metavar="DIR", help="where the image data set lives (train runs)")
    v.add_argument("--split", choices=["test", "train", "all"], default="test", help="which part to score (default: test)")
    v.add_argument("--weights", choices=["best", "last"], help="last (default: the final weights, as summary.json) "
                   "or best (best.pt; train runs)")
    v.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    v.add_argument("--batch-size", type=int, metavar="B", help="samples per forward pass (default: the run's "
                   "train.eval_batch_size)")
    v.add_argument("--out", required=True, metavar="FILE", help="a new JSON file (never overwritten)")
    v.set_defaults(func=cmd_eval)
    m = sub.add_parser("methods", help="list methods, their hyper-parameters and formulas", parents=[imports])
    m.add_argument("names", nargs="*")
    m.set_defaults(func=cmd_methods)
    sub.add_parser("models", help="list model names", parents=[imports]).set_defaults(func=cmd_models)
    sub.add_parser("presets", help="list named recipes").set_defaults(func=cmd_presets)
    return p


def _os_error(err: OSError) -> str:
    import errno

    if err.errno in (errno.ENOSPC, errno.EDQUOT) and err.filename:
        from ..engine.rundir import disk_full

        return str(disk_full(Path(err.filename), err))
    where = f"{err.filename}: " if err.filename else ""
    text = (err.strerror or str(err)).strip()
    return where + (text.splitlines()[0] if text else type(err).__name__)


def main(argv: list[str] | None = None) -> int:
    import os

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 reports; every rank exits non-zero
    try:
        if getattr(args, "out", None):  # every --out: never write through (and so replace) a dangling link
            from ..engine.rundir import check_no_dangling

            check_no_dangling(Path(args.out))
        args.recorded = []
        if args.imports:
            from ..plugins import import_modules

            args.recorded = import_modules(args.imports)
        return args.func(args)
    except SelfKDError as err:
        if args.debug:
            raise
        if not quiet:
            print(f"selfkd: error: {err}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("selfkd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `selfkd methods | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # the file system said no somewhere no check caught: still one line
        if args.debug:
            raise
        print(f"selfkd: error: {_os_error(err)}", file=sys.stderr)
        return EXIT_USER
    except Exception as err:  # one rank of several: its own failure, or a peer's (one line, by one rank)
        from ._ranks import rank_failure

        code = None if args.debug else rank_failure(args, err)
        if code is None:
            raise
        return code
