"""resume: restore a saved state (adapter, optimizer, scheduler, scaler, timestep sampler, RNG, data position),
or on a fresh start render the baseline previews and the VAE round-trip check."""

from __future__ import annotations

from anima_core.training import sampling
from anima_core.training.context import TrainingContext
from anima_core.training.state import load_state, restore_rng


def run(ctx: TrainingContext) -> None:
    boot, opt, prog = ctx.bootstrap, ctx.optimization, ctx.progress
    path = boot.resume_from
    if path is not None:
        info, _, optim = load_state(path)
        ctx.models.adapter.load(path / "adapter.safetensors")
        opt.optimizer.load_state_dict(optim["optimizer"])
        opt.scheduler.load_state_dict(optim["scheduler"])
        scaler = boot.accelerator.scaler
        if scaler is not None and optim.get("scaler"):
            scaler.load_state_dict(optim["scaler"])
        if hasattr(opt.timestep_sampler, "load_state_dict") and optim.get("timestep_sampler") is not None:
            opt.timestep_sampler.load_state_dict(optim["timestep_sampler"])
        prog.global_step = info["global_step"]
        prog.epoch = info["epoch"]
        prog.batch_in_epoch = info["batch_in_epoch"]
        prog.loss_history = [tuple(x) for x in info.get("loss_history", [])]
        restore_rng(info["rng"], optim.get("torch_rng"), optim.get("cuda_rng"))
        boot.monitor.note(f"resumed from {path} at step {prog.global_step} (epoch {prog.epoch + 1}, "
                          f"batch {prog.batch_in_epoch})")
    if hasattr(opt.optimizer, "train"):
        opt.optimizer.train()  # schedule-free optimizers load in whatever mode they were saved in
    ctx.models.train_module.train()
    boot.monitor.start(opt.total_steps, opt.epochs, prog.global_step)
    if path is None and boot.is_main:
        first = next(iter(ctx.dataset.data.batches(0)), None)
        if first is not None:
            sampling.vae_round_trip(ctx, first.latents)
        s = ctx.config.sample
        if s.prompts and s.baseline:
            sampling.render(ctx, s.prompts[:4], "step_0_baseline")
    boot.accelerator.wait_for_everyone()
