"""resume: restore a saved state (adapter, optimizer, scheduler, scaler, timestep sampler, RNG, data position),
or on a fresh start render the baseline previews and the VAE round-trip check."""

from __future__ import annotations

from anima_core.errors import UserError
from anima_core.training import sampling
from anima_core.training.context import TrainingContext
from anima_core.training.finite import all_finite, describe, nonfinite_in, nonfinite_names
from anima_core.training.phases.bootstrap import open_outputs
from anima_core.training.state import load_state, restore_rng


def _refuse_nonfinite(path, tensors, optim) -> None:
    """A state with NaN/inf weights or optimizer moments trains nothing (every step is skipped, or makes the weights
    NaN at once): refused before the run starts, naming what is bad."""
    bad = nonfinite_names(tensors)
    where = "adapter weights"
    if not bad:
        bad, where = nonfinite_in(optim.get("optimizer")), "optimizer state tensors"
    if bad:
        raise UserError(f"--resume: the state in {path} is not usable: {len(bad)} {where} are NaN/inf "
                        f"({describe(bad)}), so the run it came from had diverged; resume from an earlier state "
                        f"in {path.parent} or start again (with a lower optimizer.lr)")


def run(ctx: TrainingContext) -> None:
    boot, opt, prog = ctx.bootstrap, ctx.optimization, ctx.progress
    path = boot.resume_from
    if path is not None:
        info, tensors, optim = load_state(path)
        _refuse_nonfinite(path, tensors, optim)
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
    if not all_finite(opt.params):  # an adapter plugin whose load or init produced NaN
        raise UserError(f"adapter '{ctx.config.adapter.type}': its trainable weights are NaN/inf before the first "
                        f"step" + (f" (loaded from {path})" if path is not None else ""))
    if hasattr(opt.optimizer, "train"):
        opt.optimizer.train()  # schedule-free optimizers load in whatever mode they were saved in
    ctx.models.train_module.train()
    open_outputs(ctx, resumed=path is not None)
    data = ctx.dataset.data
    boot.monitor.note(f"latents: {data.encoded} encoded, {data.reused} reused from the cache {boot.cache_dir}")
    if path is None and boot.is_main:
        first = next(iter(ctx.dataset.data.batches(0)), None)
        if first is not None:
            sampling.vae_round_trip(ctx, first.latents)
        s = ctx.config.sample
        if s.prompts and s.baseline:
            sampling.render(ctx, s.prompts[:4], "step_0_baseline")
    boot.accelerator.wait_for_everyone()
