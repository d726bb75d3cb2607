"""loop: rectified-flow training. Per micro-batch: timestep plugin ``sample`` → noise → forward → loss plugin
``compute`` → reg-set weight → loss weighting → adapter regularisation → backward (the timestep plugin ``record``s
the raw per-sample MSE). At a group end: average gradients across processes, skip non-finite, clip, optimizer
step, scheduler step (not for schedule-free optimizers), ``maybe_refresh``; then periodic saves and previews.

Every optimizer step reseeds the random generators from (seed, rank, step), so a resumed run draws exactly what
an uninterrupted one draws.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from anima_core.objective.loss_weighting import broadcast_to, loss_weight
from anima_core.objective.noise import make_noise
from anima_core.protocols import StepContext, call_optional
from anima_core.training import sampling
from anima_core.training.checkpointing import save_checkpoint
from anima_core.training.context import TrainingContext
from anima_core.training.finite import all_finite
from anima_core.training.phases.bootstrap import derived_seed, seed_everything

# Optimizer steps skipped in a row (non-finite gradients, or fp16's grad scaler finding an overflow) that end the
# run. fp16's scaler legitimately skips while it backs off from its initial scale 2**16 (one halving per skipped
# step: at most 16 before it reaches 1), so the limit sits past that; any longer streak means every batch fails,
# and going on would only burn hours and then save weights that learnt nothing.
MAX_SKIPPED_STEPS = 20


class TrainingDiverged(RuntimeError):
    """Training cannot go on (NaN/inf weights, or every step skipped): exit 1 with the likely cause."""


@dataclass
class _Skips:
    """Why optimizer steps were skipped, for telling the user the likely cause."""

    attempts: int = 0  # optimizer steps attempted by this process
    steps: int = 0  # of which skipped
    streak: int = 0  # skipped in a row, up to now
    streak_start: int = 0  # the step number the streak began at
    bad_data: list[str] = field(default_factory=list)  # images whose latents were NaN/inf (in the streak)
    bad_loss: int = 0  # micro-batches with finite latents but a non-finite loss (in the streak)
    scaler: int = 0  # steps the fp16 grad scaler skipped (in the streak)

    def reset(self) -> None:
        self.streak, self.bad_data, self.bad_loss, self.scaler = 0, [], 0, 0


def _reduce_gradients(ctx: TrainingContext) -> None:
    acc = ctx.bootstrap.accelerator
    if acc.num_processes == 1:
        return
    params = ctx.optimization.params
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    flat = acc.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    # one fused max-|g| over all grads (NaN propagates through max, and unlike a 2-norm it cannot overflow) instead
    # of one isfinite + host sync per tensor: half the cost on the demo model's ~80 LoRA tensors
    return bool(grads) and bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))


def _micro_batch(ctx: TrainingContext, batch, generator: torch.Generator, group_size: int,
                 skips: _Skips | None = None) -> float:
    cfg, boot, mods, opt = ctx.config, ctx.bootstrap, ctx.models, ctx.optimization
    device = boot.device
    x0 = batch.latents.to(device, torch.float32)
    b = x0.shape[0]
    t = opt.timestep_sampler.sample(b, generator=generator).to(device, torch.float32)
    step_ctx = StepContext(ctx.progress.global_step, opt.total_steps, ctx.progress.epoch, t, cfg)
    call_optional(mods.adapter, "on_step_begin", step_ctx)
    n = cfg.train.noise
    noise = make_noise(x0, n.type, offset=n.offset, pyramid_iterations=n.pyramid_iterations,
                       pyramid_discount=n.pyramid_discount, generator=generator)
    tb = broadcast_to(t, x0)
    noisy = (1.0 - tb) * x0 + tb * noise
    target = noise - x0
    if batch.text is not None:  # text-encoder cache
        text, qwen_hidden = batch.text.text.to(device), batch.text.qwen_hidden.to(device, mods.dtype)
    else:
        text = mods.text.tokenize(batch.captions, truncate=True).to(device)
        qwen_hidden = mods.text.encode_qwen(text).to(mods.dtype)
    with boot.accelerator.autocast():
        pred = mods.train_module(noisy.to(mods.dtype), t, qwen_hidden, text)
    pred, target = pred.float(), target.float()
    reduce_dims = tuple(range(1, pred.dim()))
    with torch.no_grad():
        raw_mse = (pred - target).pow(2).mean(dim=reduce_dims)
        keep = ~batch.is_reg.to(device)
        if keep.any() and hasattr(opt.timestep_sampler, "record"):
            opt.timestep_sampler.record(t[keep].detach().cpu(), raw_mse[keep].detach().cpu())
    per_sample = opt.loss.compute(pred, target, t).mean(dim=reduce_dims)
    lw = cfg.train.loss_weighting
    weights = batch.loss_weight.to(device) * loss_weight(
        t, lw.scheme, min_snr_gamma=lw.min_snr_gamma, detail_inv_t_min=lw.detail_inv_t_min,
        detail_inv_t_max=lw.detail_inv_t_max, cap_ratio=lw.cap_ratio)
    loss = (per_sample * weights).mean()
    reg = call_optional(mods.adapter, "regularization_loss", step_ctx)
    if reg is not None:
        loss = loss + reg
    if not torch.isfinite(loss):
        ctx.progress.skipped_nonfinite += 1  # skip only this micro-batch; the group's other grads stay
        if skips is not None:
            finite_rows = torch.isfinite(x0.flatten(1)).all(dim=1).tolist()
            if all(finite_rows):
                skips.bad_loss += 1
            else:
                skips.bad_data += [k for k, ok in zip(batch.keys, finite_rows) if not ok]
        return float("nan")
    boot.accelerator.backward(loss / group_size)
    return float(loss.detach())


def _optimizer_step(ctx: TrainingContext, skips: _Skips | None = None) -> bool:
    cfg, boot, opt = ctx.config, ctx.bootstrap, ctx.optimization
    _reduce_gradients(ctx)
    if boot.accelerator.scaler is None and not _grads_finite(opt.params):
        opt.optimizer.zero_grad(set_to_none=True)
        boot.monitor.note(f"warning: non-finite gradients at step {ctx.progress.global_step + 1}: step skipped")
        return False
    if cfg.train.grad_clip > 0:
        boot.accelerator.clip_grad_norm_(opt.params, cfg.train.grad_clip)
    opt.optimizer.step()
    skipped = getattr(opt.optimizer, "step_was_skipped", False)  # fp16 scaler found inf/nan
    opt.optimizer.zero_grad(set_to_none=True)
    if skipped:
        if skips is not None:
            skips.scaler += 1
        return False
    if "schedule_free" not in opt.capabilities:
        opt.scheduler.step()
    return True


def _likely_cause(ctx: TrainingContext, skips: _Skips) -> str:
    cfg = ctx.config
    if skips.bad_data:
        names = sorted(set(skips.bad_data))
        return (f"the training data is NaN/inf: the cached latents of {', '.join(names[:3])}"
                f"{f' and {len(names) - 3} more' if len(names) > 3 else ''} are not finite (a VAE that overflows, "
                f"e.g. model.vae_dtype: fp16, or damaged cache files); delete {ctx.bootstrap.cache_dir} and run again")
    if skips.scaler:
        return ("the fp16 grad scaler found an overflow at every step: use train.mixed_precision: bf16, or lower "
                f"optimizer.lr (now {cfg.optimizer.lr})")
    if skips.bad_loss:
        return (f"the loss is NaN/inf although the data and the adapter weights are finite: the model overflows in "
                f"model.dtype {cfg.model.dtype} / train.mixed_precision {cfg.train.mixed_precision} (try bf16 or "
                f"fp32), or the loss '{cfg.loss.type}' / adapter regularisation diverges")
    return (f"the gradients are NaN/inf although the loss is finite: optimizer.lr ({cfg.optimizer.lr}) is too high "
            f"or train.mixed_precision {cfg.train.mixed_precision} overflows (try bf16)")


def _skipped(ctx: TrainingContext, skips: _Skips) -> None:
    """After a skipped step: stop at once if the weights are no longer finite, or after MAX_SKIPPED_STEPS."""
    prog, opt = ctx.progress, ctx.optimization
    if skips.streak == 0:
        skips.streak_start = prog.global_step + 1
    skips.streak += 1
    skips.steps += 1
    ctx.bootstrap.monitor.count_skips(prog.skipped_nonfinite, skips.steps)
    _check_weights(ctx)
    if skips.streak >= MAX_SKIPPED_STEPS:
        raise TrainingDiverged(
            f"{skips.streak} optimizer steps in a row were skipped (steps {skips.streak_start}–"
            f"{skips.streak_start + skips.streak - 1}, {prog.skipped_nonfinite} micro-batch(es) with a non-finite "
            f"loss): {_likely_cause(ctx, skips)}. The run is stopped" + _last_saved(ctx))


def _check_weights(ctx: TrainingContext) -> None:
    # The weights were checked finite before the first step: if they are not now, an optimizer step made them so.
    if not all_finite(ctx.optimization.params):
        cfg = ctx.config
        raise TrainingDiverged(
            f"the adapter weights became NaN/inf at optimizer step {ctx.progress.global_step}: optimizer.lr "
            f"({cfg.optimizer.lr}) is too high (or infinite) for '{cfg.optimizer.type}'; lower it. Nothing was "
            f"saved from these weights" + _last_saved(ctx))


def _last_saved(ctx: TrainingContext) -> str:
    state = ctx.progress.last_state
    return f"; the last saved state is {state}" if state is not None else ""


def _check_ranks_in_sync(ctx: TrainingContext) -> None:
    """With ANIMA_CHECK_RANK_SYNC=1: every process compares its adapter weights with rank 0's after each step
    (a diagnostic for multi-process runs; it costs one all-gather per step)."""
    acc = ctx.bootstrap.accelerator
    flat = torch.cat([p.detach().float().flatten() for p in ctx.optimization.params]).to(acc.device)
    gathered = acc.gather(flat.unsqueeze(0))
    if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
        raise RuntimeError(f"adapter weights differ between processes after step {ctx.progress.global_step}")
    ctx.progress.rank_checks += 1


def _optimizer_metrics(optimizer) -> dict[str, float]:
    """Step-size estimates that adaptive optimizers keep in their param groups (Prodigy-style ``d``, and
    ``effective_lr`` where the optimizer computes one): reported without core naming any optimizer."""
    group = optimizer.param_groups[0]
    if "d" not in group:
        return {}
    d = float(group["d"])
    effective = float(group.get("effective_lr", group["lr"]))
    return {"optimizer/d": d, "optimizer/effective_lr": d * effective}


def _stop_requested(ctx: TrainingContext) -> bool:
    acc = ctx.bootstrap.accelerator
    flag = torch.tensor([1.0 if ctx.bootstrap.stop.requested else 0.0], device=acc.device)
    if acc.num_processes > 1:
        flag = acc.reduce(flag, reduction="sum")
    return bool(flag.item() > 0)


def _periodic(ctx: TrainingContext, count: int, label: str, *, sample_every, lora_every, state_every) -> None:
    """Previews and saves due after ``count`` steps or epochs (``label`` names the files, e.g. step000120)."""
    cfg = ctx.config
    prompts = cfg.sample.prompts
    if prompts and sample_every and count % sample_every == 0 and ctx.bootstrap.is_main:
        sampling.render(ctx, [prompts[(count // sample_every) % len(prompts)]], label)
    lora = bool(lora_every and count % lora_every == 0)
    state = bool(state_every and count % state_every == 0)
    if lora or state:
        _check_weights(ctx)  # the save would refuse them anyway; this names the cause
        save_checkpoint(ctx, lora_name=f"{cfg.output.name}_{label}" if lora else None, state=state)


def _after_step(ctx: TrainingContext) -> None:
    out, step = ctx.config.output, ctx.progress.global_step
    _periodic(ctx, step, f"step{step:06d}", sample_every=ctx.config.sample.every_n_steps,
              lora_every=out.save_every_n_steps, state_every=out.save_state_every_n_steps)


def _after_epoch(ctx: TrainingContext) -> None:
    out, epoch = ctx.config.output, ctx.progress.epoch  # epochs completed
    _periodic(ctx, epoch, f"epoch{epoch:04d}", sample_every=ctx.config.sample.every_n_epochs,
              lora_every=out.save_every_n_epochs, state_every=out.save_state_every_n_epochs)


def run(ctx: TrainingContext) -> None:
    cfg, boot, opt, prog = ctx.config, ctx.bootstrap, ctx.optimization, ctx.progress
    data = ctx.dataset.data
    accum = cfg.train.grad_accum
    rank = boot.accelerator.process_index
    check_sync = os.environ.get("ANIMA_CHECK_RANK_SYNC") == "1" and boot.accelerator.num_processes > 1
    skips = _Skips()
    while prog.epoch < opt.epochs and prog.global_step < opt.total_steps:
        n_batches = len(data)
        losses: list[float] = []
        generator = torch.Generator()
        for index, batch in enumerate(data.batches(prog.epoch, start=prog.batch_in_epoch), prog.batch_in_epoch):
            group_start = index - index % accum
            group_size = min(accum, n_batches - group_start)  # the epoch's tail group still steps
            if index == group_start:
                step_seed = derived_seed(cfg.train.seed, rank, prog.global_step)
                seed_everything(step_seed)
                generator.manual_seed(step_seed)
                losses = []
            losses.append(_micro_batch(ctx, batch, generator, group_size, skips))
            if index + 1 < group_start + group_size:
                continue
            lr = opt.optimizer.param_groups[0]["lr"]  # the lr this step runs at (the scheduler steps after it)
            stepped = _optimizer_step(ctx, skips)
            prog.batch_in_epoch = index + 1
            skips.attempts += 1
            if not stepped:
                _skipped(ctx, skips)
            else:
                skips.reset()
                boot.monitor.count_skips(prog.skipped_nonfinite, skips.steps)
                prog.global_step += 1
                call_optional(opt.timestep_sampler, "maybe_refresh", prog.global_step)
                if check_sync:
                    _check_ranks_in_sync(ctx)
                finite = [v for v in losses if math.isfinite(v)]
                mean = sum(finite) / len(finite) if finite else float("nan")
                if math.isfinite(mean):
                    prog.loss_history.append((prog.global_step, mean))
                status = call_optional(opt.timestep_sampler, "status", default={}) or {}
                extra = {f"timestep_sampler/{k}": float(v) for k, v in status.items()
                         if isinstance(v, (int, float, bool))}
                extra.update(_optimizer_metrics(opt.optimizer))
                boot.monitor.log_step(prog.global_step, prog.epoch, mean, lr, extra)
                _after_step(ctx)
            if _stop_requested(ctx):
                ctx.interrupted = True
                _check_weights(ctx)
                save_checkpoint(ctx, lora_name=f"{cfg.output.name}_interrupted", state=True)
                return
            if prog.global_step >= opt.total_steps:
                break
        else:
            prog.epoch += 1
            prog.batch_in_epoch = 0
            _after_epoch(ctx)
            continue
        break  # max_steps reached mid-epoch
    if skips.attempts and skips.steps == skips.attempts:  # a run shorter than MAX_SKIPPED_STEPS that never stepped
        raise TrainingDiverged(f"all {skips.attempts} optimizer steps were skipped ({prog.skipped_nonfinite} "
                               f"micro-batch(es) with a non-finite loss): {_likely_cause(ctx, skips)}; nothing "
                               f"was trained, so nothing is saved")
    _check_weights(ctx)  # before finalize saves them
    if check_sync:
        boot.monitor.note(f"rank sync check: {boot.accelerator.num_processes} processes held identical adapter "
                          f"weights after each of {prog.rank_checks} steps")
