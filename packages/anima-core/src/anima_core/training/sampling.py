"""Preview images during training: the configured inference sampler on the current adapter, in eval mode
(schedule-free optimizers switch to their averaged weights), and never allowed to kill training."""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path
from typing import Iterator

from anima_core.training.context import TrainingContext


@contextlib.contextmanager
def eval_mode(ctx: TrainingContext) -> Iterator[None]:
    """Optimizer (``schedule_free``) and modules in eval mode around sampling and saving, train mode after."""
    optimizer = ctx.optimization.optimizer if ctx.optimization else None
    module = ctx.models.train_module
    if optimizer is not None and hasattr(optimizer, "eval"):
        optimizer.eval()
    module.eval()
    try:
        yield
    finally:
        module.train()
        if optimizer is not None and hasattr(optimizer, "train"):
            optimizer.train()


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
        with eval_mode(ctx):
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
        image = ctx.models.vae.decode(latents[:1].to(ctx.bootstrap.device))[0]
        array = ((image.permute(1, 2, 0).cpu().float() + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        path = ctx.bootstrap.sample_dir / "vae_roundtrip.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_with(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
    except Exception as exc:
        print(f"warning: VAE round-trip check failed: {exc}", file=sys.stderr)
