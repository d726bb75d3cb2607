"""finalize: the final LoRA (and state, so a run can be extended), the loss curve, and closing the logs."""

from __future__ import annotations

from anima_core.training.checkpointing import save_checkpoint
from anima_core.training.context import TrainingContext


def run(ctx: TrainingContext) -> None:
    boot = ctx.bootstrap
    try:
        if not ctx.interrupted:
            save_checkpoint(ctx, lora_name=ctx.config.output.name, state=True)
    finally:
        boot.monitor.close()
        boot.stop.restore()
