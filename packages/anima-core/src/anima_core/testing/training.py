"""Helpers for end-to-end training tests of core and plugins: a tiny run's config, and a loss that depends only on
the weights (fixed images, t grid and noise), to prove a run learned."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def tiny_train_config(tiny, images: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A CPU/fp32/64 px config on ``write_tiny_model_set`` files; ``sections`` update the defaults per section."""
    cfg: dict[str, Any] = {
        "model": {"transformer": str(tiny.transformer), "text_encoder": str(tiny.text_encoder),
                  "vae": str(tiny.vae), "qwen_tokenizer": str(tiny.qwen_tokenizer),
                  "t5_tokenizer": str(tiny.t5_tokenizer), "dtype": "fp32", "gradient_checkpointing": False},
        "dataset": {"path": str(images), "resolution": [64]},
        "adapter": {"type": "lora", "rank": 4, "alpha": 4.0},
        "optimizer": {"type": "adamw", "lr": 2e-3, "weight_decay": 0.0},
        "train": {"max_steps": 6, "batch_size": 2, "mixed_precision": "no", "seed": 3},
        "sample": {"width": 64, "height": 64, "steps": 2, "baseline": False},
        "output": {"dir": str(out), "tensorboard": False, "save_every_n_epochs": None,
                   "save_state_every_n_epochs": None, "log_every": 1},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def fixed_eval_loss(tiny, images: Path, lora: Optional[Path] = None) -> float:
    """Velocity MSE on the images (first batch of 4) at t = 0.2, 0.4, 0.6, 0.8 with fixed noise, with a LoRA file
    merged if given."""
    import torch

    from anima_core.data import build_training_data
    from anima_core.data.config import DatasetSection
    from anima_core.model.models import AnimaModels

    models = AnimaModels.load(tiny.transformer, tiny.text_encoder, tiny.vae, tiny.qwen_tokenizer, tiny.t5_tokenizer)
    if lora is not None:
        models.apply_lora(lora, 1.0)
    data = build_training_data(DatasetSection(path=images, resolution=[64]), seed=0, batch_size=4,
                               cache_dir=Path(images).parent / "eval-cache", vae=models.vae, progress=False)
    batch = next(iter(data.batches(0)))
    g = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        ctx = models.encode_prompts(batch.captions)
        for t in (0.2, 0.4, 0.6, 0.8):
            noise = torch.randn(batch.latents.shape, generator=g)
            noisy = (1 - t) * batch.latents + t * noise
            v = models.predict_velocity(noisy, torch.full((len(batch.captions),), t), ctx)
            total += float((v - (noise - batch.latents)).pow(2).mean())
    return total / 4
