"""Preview images during training: the configured inference sampler on the current adapter, in eval mode
(schedule-free optimizers switch to their averaged weights), and never allowed to kill training."""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path
from typing import Iterator

from anima_core.training import residency
from anima_core.training.context import TrainingContext


@contextlib.contextmanager
def eval_mode(ctx: TrainingContext) -> Iterator[None]:
    """Optimizer (``schedule_free``) and modules in eval mode around sampling and saving, train mode after, with
    the train-mode weights restored bit for bit: a schedule-free ``eval()`` / ``train()`` pair interpolates the
    weights there and back, which rounds, so every preview or save would otherwise nudge the run."""
    import torch

    optimizer = ctx.optimization.optimizer if ctx.optimization else None
    module = ctx.models.train_module
    swaps = optimizer is not None and hasattr(getattr(optimizer, "optimizer", optimizer), "eval")
    saved = []
    if swaps:
        with torch.no_grad():
            saved = [(p, p.detach().clone()) for p in ctx.optimization.params]
        optimizer.eval()
    module.eval()
    try:
        yield
    finally:
        module.train()
        if swaps:
            optimizer.train()
            with torch.no_grad():
                for p, train_weights in saved:
                    p.copy_(train_weights)


def render(ctx: TrainingContext, prompts: list[str], tag: str) -> list[Path]:
    """One PNG per prompt (prompt i uses seed + i); failures are warnings."""
    from anima_core.model.models import AnimaModels, GenerationParams
    from anima_core.model.png import save_png

    cfg, boot = ctx.config, ctx.bootstrap
    s = cfg.sample
    models = AnimaModels(ctx.models.dit, ctx.models.text, ctx.models.vae, boot.device, ctx.models.dtype)
    spec = ctx.registry.spec("inference_sampler", s.sampler.type)
    paths = []
    boot.sample_dir.mkdir(parents=True, exist_ok=True)
    try:
        with eval_mode(ctx), residency.on_device(ctx):
            for i, prompt in enumerate(prompts):
                params = GenerationParams(prompt=prompt, negative_prompt=s.negative_prompt, width=s.width,
                                          height=s.height, steps=s.steps, cfg=s.cfg, shift=s.shift,
                                          seed=s.seed + i, sampler=s.sampler.type,
                                          sampler_options=s.sampler.model_dump(exclude={"type"}))
                image = models.generate(params, sampler=spec.build(s.sampler))
                path = boot.sample_dir / f"{tag}_{i}.png"
                save_png(image, path, params.as_metadata())
                paths.append(path)
    except Exception as exc:  # a preview must never end a long run
        print(f"warning: sampling '{tag}' failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
    boot.monitor.log_samples(paths, ctx.progress.global_step)
    return paths


def vae_round_trip(ctx: TrainingContext, latents) -> None:
    """Decode the first cached latent: a broken VAE or latent cache shows at once, before hours of training."""
    from PIL import Image

    from anima_core import atomic

    try:
        with residency.on_device(ctx):
            image = ctx.models.vae.decode(latents[:1].to(ctx.bootstrap.device))[0]
        array = ((image.permute(1, 2, 0).cpu().float() + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        path = ctx.bootstrap.sample_dir / "vae_roundtrip.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_with(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
    except Exception as exc:
        print(f"warning: VAE round-trip check failed: {exc}", file=sys.stderr)
