"""``anima train``"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer


def train(config: Optional[Path] = typer.Argument(None, help="YAML training config."),
          set_: List[str] = typer.Option([], "--set", help="Override a value: key.path=value (repeatable)."),
          resume: Optional[str] = typer.Option(None, "--resume", help="A state folder, or 'auto' for the newest "
                                                                      "complete state in <output.dir>/state."),
          demo: bool = typer.Option(False, "--demo", help="Teach the packaged tiny pretrained base an unseen "
                                                           "colour (CPU, a few minutes), with before/after figures."),
          output: Path = typer.Option(Path("anima-demo"), "--output", help="Folder for --demo.")) -> None:
    """Train an adapter. Config errors are all reported before any model loads (exit 2).

    Multi-GPU: torchrun --nproc_per_node=N -m anima_core train CONFIG (or accelerate launch).
    """
    from anima_core.config.loading import load_config, validate_config
    from anima_core.errors import UserError
    from anima_core.plugin_host import get_host
    from anima_core.training.api import TrainingInterrupted
    from anima_core.training.api import train as run_training

    registry = get_host().registry
    if demo:
        from anima_core.config.loading import apply_overrides
        from anima_core.training.demo import demo_config

        loaded = validate_config(apply_overrides(demo_config(output), set_), registry, source="--demo")
    elif config is None:
        raise UserError("anima train needs a CONFIG file (or --demo)")
    else:
        loaded = load_config(config, set_, registry)
    for issue in loaded.warnings:
        typer.echo(f"{config}: warning: {issue}", err=True)
    try:
        result = run_training(loaded.config, resume=resume)
    except TrainingInterrupted as stop:
        again = f"anima train {config} --resume auto" if config else "anima train --demo --resume auto"
        typer.echo(f"interrupted at step {stop.result.steps}: state saved in {stop.result.state}; continue with "
                   f"`{again}`", err=True)
        sys.exit(130)
    typer.echo(f"done: {result.steps} steps\n  LoRA:    {result.lora}\n  state:   {result.state}\n"
               f"  samples: {result.output_dir / 'samples'}\n  loss:    {result.output_dir / 'loss_curve.png'}")
    if demo and result.lora is not None:
        from anima_core.training.demo import report

        typer.echo("scoring base vs LoRA samples ...")
        figures = report(output, loaded.config, result.lora)
        typer.echo(figures.summary.read_text(), nl=False)
