"""bootstrap: check inputs up front (before any model loads), set up the process and logging; the output folder is
written only once the run is known to start (:func:`open_outputs`, called by the resume phase)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from anima_core import atomic
from anima_core.errors import UserError
from anima_core.training.context import Bootstrap, TrainingContext
from anima_core.training.monitor import Monitor
from anima_core.training.signals import StopFlag

REQUIRED_MODEL_FILES = ("transformer", "text_encoder", "vae", "qwen_tokenizer", "t5_tokenizer")


def check_inputs(config) -> None:
    """Every model path and the dataset, checked together so the user sees all problems at once."""
    from anima_core.data import scan_dataset

    problems = []
    for name in REQUIRED_MODEL_FILES:
        value = getattr(config.model, name)
        if value is None:
            problems.append(f"model.{name}: not set")
        elif not Path(value).exists():
            problems.append(f"model.{name}: not found: {value}")
    if config.dataset.path is None:
        problems.append("dataset.path: not set")
    if problems:
        raise UserError("cannot start training:\n  " + "\n  ".join(problems))
    scan_dataset(config.dataset)  # raises UserError for a missing/empty folder or no usable image


def derived_seed(seed: int, *parts: int) -> int:
    """A seed for (run seed, rank, step, ...) that does not depend on what consumed random numbers before, so a
    resumed run draws exactly what an uninterrupted one draws."""
    value = seed & 0xFFFFFFFF
    for part in parts:
        value = (value * 6364136223846793005 + part * 1442695040888963407 + 1) % (1 << 63)
    return value


def seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value % (1 << 32))
    torch.manual_seed(value)


def run(ctx: TrainingContext) -> None:
    from accelerate import Accelerator

    cfg = ctx.config
    check_inputs(cfg)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cfg.train.cpu)
    # Nothing is written into output.dir here: it may hold an earlier run's records, and a run that then fails
    # (a model that does not load, a bad state to resume) must leave them as they were. See open_outputs.
    output_dir = Path(cfg.output.dir).resolve()
    from anima_core.training.state import resolve_resume

    state_root = output_dir / "state"
    resume_from = resolve_resume(ctx.resume_request, state_root)  # before the signal handlers go in
    seed_everything(derived_seed(cfg.train.seed, accelerator.process_index))
    stop = StopFlag()
    stop.install()
    monitor = Monitor(output_dir, enabled=accelerator.is_main_process, log_every=cfg.output.log_every,
                      tensorboard=cfg.output.tensorboard, wandb_project=cfg.output.wandb_project,
                      run_config=cfg.model_dump(mode="json"))
    ctx.bootstrap = Bootstrap(accelerator=accelerator, output_dir=output_dir, state_root=state_root,
                              sample_dir=output_dir / "samples",
                              cache_dir=Path(cfg.output.cache_dir or output_dir / "cache").resolve(),
                              monitor=monitor, stop=stop,
                              resume_from=resume_from)


def open_outputs(ctx: TrainingContext, *, resumed: bool) -> None:
    """The run is known to start (config valid, models loaded, dataset cached, optimizer built, any resumed state
    read): only now does rank 0 write ``config.yaml`` and open the monitor's files (appending to the earlier
    history when ``resumed``)."""
    boot, opt, prog = ctx.bootstrap, ctx.optimization, ctx.progress
    if boot.is_main:
        import yaml

        boot.output_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(boot.output_dir / "config.yaml",
                          yaml.safe_dump(ctx.config.model_dump(mode="json"), sort_keys=False))
    boot.monitor.start(opt.total_steps, opt.epochs, prog.global_step, resumed=resumed)
