"""``anima plan``"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def plan(config: Path = typer.Argument(..., help="YAML training config."),
         vram: Optional[float] = typer.Option(None, "--vram", help="GPU memory in GB (10^9 bytes): name the "
                                                                   "cheapest settings that fit it.",),
         architecture: Optional[str] = typer.Option(None, "--architecture", help="Plan the published shapes "
                                                    "(anima-2b) instead of the model files in the config."),
         set_: List[str] = typer.Option([], "--set", help="Override a value: key.path=value (repeatable).")) -> None:
    """Estimate the GPU memory of one training step of CONFIG, by category, and the host RAM the load needs.

    Runs the step on fake tensors (no GPU, no tensor data read: only the safetensors headers of the model files).
    """
    from anima_core.config.loading import load_config
    from anima_core.errors import UserError
    from anima_core.planning.plan import GB, fit, plan as make_plan, render, render_fit
    from anima_core.planning.shapes import shapes_from_config
    from anima_core.plugin_host import get_host

    if vram is not None and vram <= 0:
        raise UserError(f"--vram: expected a positive number of GB, found {vram:g}")
    registry = get_host().registry
    loaded = load_config(config, set_, registry)
    for issue in loaded.warnings:
        typer.echo(f"{config}: warning: {issue}", err=True)
    cfg = loaded.config
    shapes = shapes_from_config(cfg.model, architecture)
    result = make_plan(cfg, registry, shapes=shapes)
    typer.echo(render(result))
    if vram is not None:
        typer.echo(render_fit(fit(cfg, registry, int(vram * GB), base=result, shapes=shapes)))
