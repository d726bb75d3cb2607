"""``anima train --demo``: a complete run on a tiny model set and a tiny shapes dataset generated on the spot, so
the whole pipeline (loading, caching, training, previews, LoRA file, state) runs on any machine in a minute.

The tiny base has random weights: the demo proves the plumbing, not image quality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def demo_config(output: Path, *, steps: int = 30) -> dict[str, Any]:
    from anima_core.testing.datasets import write_shapes_dataset
    from anima_core.testing.tiny import write_tiny_model_set

    tiny = write_tiny_model_set(output / "models", seed=0)
    images = write_shapes_dataset(output / "data", n=8, seed=0)
    return {
        "model": {"transformer": str(tiny.transformer), "text_encoder": str(tiny.text_encoder),
                  "vae": str(tiny.vae), "qwen_tokenizer": str(tiny.qwen_tokenizer),
                  "t5_tokenizer": str(tiny.t5_tokenizer), "dtype": "fp32", "gradient_checkpointing": False},
        "dataset": {"path": str(images), "resolution": [64]},
        "adapter": {"type": "lora", "rank": 8, "alpha": 8.0},
        "optimizer": {"type": "adamw", "lr": 3e-3},
        "timestep_sampler": {"type": "logit_normal"},
        "train": {"max_steps": steps, "batch_size": 4, "mixed_precision": "no", "seed": 0},
        "sample": {"prompts": ["red circle, top left, small", "blue square, bottom right, large"],
                   "every_n_steps": steps // 2, "width": 64, "height": 64, "steps": 8, "cfg": 4.0},
        "output": {"dir": str(output / "run"), "name": "demo_lora", "save_every_n_epochs": None,
                   "save_state_every_n_epochs": None, "log_every": 5},
    }
