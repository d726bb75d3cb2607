"""optimizer: the optimizer, lr schedule, timestep sampler and loss, and the step budget."""

from __future__ import annotations

import math

from anima_core.errors import UserError
from anima_core.training.context import Optimization, TrainingContext


def _param_groups(adapter, weight_decay: float) -> list[dict]:
    groups = adapter.get_param_groups(weight_decay)
    excludes = getattr(adapter, "excludes_weight_decay", None)
    named = getattr(getattr(adapter, "network", None), "named_parameters", None)
    if excludes is None or named is None or weight_decay == 0:
        return groups
    # The adapter's optional hook: parameters it names get no weight decay (e.g. LoKr's w1).
    no_decay = {id(p) for name, p in named() if excludes(name)}
    out = []
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in no_decay]
        drop = [p for p in g["params"] if id(p) in no_decay]
        out += [{**g, "params": keep}] if keep else []
        out += [{**g, "params": drop, "weight_decay": 0.0}] if drop else []
    return out


def run(ctx: TrainingContext) -> None:
    cfg, reg = ctx.config, ctx.registry
    adapter = ctx.models.adapter
    groups = _param_groups(adapter, cfg.optimizer.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise UserError(f"adapter '{cfg.adapter.type}' has no trainable parameters (do adapter.targets match?)")
    opt_spec = reg.spec("optimizer", cfg.optimizer.type)
    optimizer = opt_spec.build(cfg.optimizer, groups)
    batches = len(ctx.dataset.data)
    steps_per_epoch = max(1, math.ceil(batches / cfg.train.grad_accum))  # the tail group steps too
    if cfg.train.max_steps:
        total_steps = cfg.train.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = cfg.train.epochs
        total_steps = steps_per_epoch * epochs
    scheduler = reg.spec("lr_scheduler", cfg.lr_scheduler.type).build(cfg.lr_scheduler, optimizer, total_steps)
    sampler = reg.spec("timestep_sampler", cfg.timestep_sampler.type).build(cfg.timestep_sampler,
                                                                            total_steps=total_steps)
    loss = reg.spec("loss", cfg.loss.type).build(cfg.loss)
    # Wrapping gives the fp16 grad scaler; the scheduler is stepped by us once per optimizer step.
    optimizer = ctx.bootstrap.accelerator.prepare_optimizer(optimizer, device_placement=False)
    ctx.optimization = Optimization(optimizer=optimizer, scheduler=scheduler, timestep_sampler=sampler, loss=loss,
                                    params=params, capabilities=opt_spec.capabilities,
                                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs=epochs)
