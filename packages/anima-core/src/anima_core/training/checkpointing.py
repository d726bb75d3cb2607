"""Saving LoRA files and full states from the loop (rank 0 writes; every rank waits for it)."""

from __future__ import annotations

from anima_core.training import outputs, state as state_files
from anima_core.training.context import TrainingContext
from anima_core.training.sampling import eval_mode


def save_checkpoint(ctx: TrainingContext, *, lora_name: str | None, state: bool) -> None:
    boot, prog = ctx.bootstrap, ctx.progress
    if boot.is_main:
        if lora_name is not None:
            with eval_mode(ctx):  # schedule-free optimizers save their averaged weights
                prog.last_lora = outputs.save_lora(ctx, lora_name)
        if state:
            # in train mode: the state holds the exact weights training continues from (and the optimizer in the
            # mode they belong to), so a resumed run is bit-identical to one that never stopped
            prog.last_state = _save_state(ctx)
    boot.accelerator.wait_for_everyone()


def _save_state(ctx: TrainingContext):
    boot, opt, prog, cfg = ctx.bootstrap, ctx.optimization, ctx.progress, ctx.config
    scaler = boot.accelerator.scaler
    optim = {
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "timestep_sampler": opt.timestep_sampler.state_dict() if hasattr(opt.timestep_sampler, "state_dict")
        else None,
    }
    info = {"global_step": prog.global_step, "epoch": prog.epoch, "batch_in_epoch": prog.batch_in_epoch,
            "loss_history": prog.loss_history[-10_000:], "config": cfg.model_dump(mode="json")}
    # the adapter's own format and precision, written straight into the state folder
    return state_files.save_state(boot.state_root, step=prog.global_step,
                                  write_adapter=lambda path: outputs.save_adapter(ctx.models.adapter, path, {}),
                                  optim=optim,
                                  info=info, keep=cfg.output.keep_states)
