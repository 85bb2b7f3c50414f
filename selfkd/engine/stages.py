"""``train_run``: one config into one run directory, with a CE teacher stage first when the method needs one."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable

from .. import distributed
from ..methods import method_class
from . import checkpoint as ckpt
from . import logs, rundir, system
from .config import Config, MethodCfg
from .rundir import CONFIG, SUMMARY
from .setup import build
from .trainer import Trainer

TEACHER_DIR = "teacher"


def train_run(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool | None = None,
              log: Callable[[str], None] | None = None, threads: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``, first training a CE teacher when the method needs one.

    Before any data is loaded, ``run_dir`` must be writable and (unless ``resume``) new or empty; the
    data and model are then built (a bad config writes nothing), and the run's lock is held while
    anything is written. ``resume``: continue from the checkpoint when there is one, else start.

    A method with ``needs_teacher`` and no ``method.teacher`` gets ``RUN/teacher``: a CE run of the
    same config (model, data, seed, epochs). ``config.yaml`` is written before the teacher trains,
    so ``--resume`` works at any point: an unfinished teacher is resumed first.
    """
    run = Path(run_dir)
    main_rank = distributed.is_main()
    say = (log or (lambda msg: print(msg, file=sys.stderr, flush=True))) if main_rank else (lambda msg: None)

    def checks() -> None:
        rundir.check_writable(run, "--resume" if resume else "--out")
        if not resume:
            rundir.check_new(run)
        logs.check_dir(run, cfg.train.log)  # a resumed run's RUN/tb: before any data is loaded
        if cfg.train.compile and cfg.train.compile_cache:
            system.check_compile_cache(cfg.train.compile_cache)

    distributed.on_main(checks)
    teacher: Trainer | None = None
    if method_class(cfg.method.name).needs_teacher:
        own_teacher = run / TEACHER_DIR
        if cfg.method.params().get("teacher") is None:
            params = cfg.method.params() | {"teacher": str(own_teacher)}
            cfg = cfg.model_copy(update={"method": MethodCfg(name=cfg.method.name, **params)})
        if Path(cfg.method.params()["teacher"]).resolve() == own_teacher.resolve() and not (own_teacher / SUMMARY).exists():
            teacher_cfg = cfg.model_copy(update={"method": MethodCfg(name="ce")})
            # validate data and model before anything is written
            teacher = Trainer(build(teacher_cfg), own_teacher, progress=progress, log=log, threads=threads)
    student = None if teacher is not None else Trainer(build(cfg), run, progress=progress, log=log, threads=threads)
    with distributed.main_first(rundir.locked(run) if main_rank else contextlib.nullcontext()):
        if not resume:  # again under the lock: another process may have started here meanwhile
            distributed.on_main(lambda: rundir.check_new(run))
        if teacher is not None:
            if not resume and main_rank:
                ckpt.write_text(run / CONFIG, cfg.to_yaml())
            say(f"training the CE teacher first: {teacher.dir}")
            teacher.run(resume=(teacher.dir / CONFIG).exists())
            student = Trainer(build(cfg), run, progress=progress, log=log, threads=threads)
        assert student is not None
        return student.run(resume=resume)
