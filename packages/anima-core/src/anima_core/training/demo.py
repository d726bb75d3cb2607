"""``anima train --demo``: teach the packaged tiny *pretrained* base (``anima_core.demo``) the colour it never saw
(``purple``) with a LoRA, through the normal config → loaders → training path, then measure it.

The run writes, under ``--output``: ``data/`` (the generated training images), ``run/`` (the LoRA, state, previews,
loss curve as any run), ``before_after.png`` (base vs LoRA, same prompts and seeds), ``summary.txt`` and
``summary.json`` (held-out-colour rate before/after and seen-concept scores, from ``anima_core.demo.scoring``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_STEPS = 300  # ~2 min on 2 cores; 200 steps leave the large purple shapes half blue (5 of 8 held-out samples)
HELD_OUT_IMAGES = 32  # purple shapes: the new concept
SEEN_IMAGES = 16  # seen colours too, so the LoRA learns the word 'purple' rather than "paint everything purple"


def write_demo_dataset(folder: Path, seed: int = 0) -> Path:
    """The LoRA's training images: :data:`HELD_OUT_IMAGES` held-out-colour shapes and :data:`SEEN_IMAGES` others,
    with captions, in one folder."""
    from anima_core.demo import shapes

    shapes.write_dataset(folder, HELD_OUT_IMAGES, seed=seed, colours=[shapes.HELD_OUT])
    shapes.write_dataset(folder, SEEN_IMAGES, seed=seed + 1, colours=shapes.SEEN_COLOURS, start=HELD_OUT_IMAGES)
    return folder


def demo_config(output: Path, *, steps: int = DEMO_STEPS) -> dict[str, Any]:
    """A training config on the packaged base and a freshly generated dataset in ``output/data``."""
    from anima_core.demo import base_model_paths
    from anima_core.demo.base import SAMPLE_SETTINGS
    from anima_core.demo.evaluate import held_out_prompts

    output = Path(output)
    base = base_model_paths()
    images = write_demo_dataset(output / "data")
    sample = {k: v for k, v in SAMPLE_SETTINGS.items() if k != "sampler"}
    return {
        "model": {**base.as_model_section(), "dtype": "fp32", "gradient_checkpointing": False},
        "dataset": {"path": str(images), "resolution": [64], "caption_dropout": 0.1},
        # the LLM adapter too: 'purple' reaches the DiT only through it, and its T5 embedding was never trained
        "adapter": {"type": "lora", "rank": 16, "alpha": 16.0, "train_llm_adapter": True},
        "optimizer": {"type": "adamw", "lr": 2e-3, "weight_decay": 0.0},
        "timestep_sampler": {"type": "logit_normal"},
        "train": {"max_steps": steps, "batch_size": 8, "mixed_precision": "no", "seed": 0, "cpu": True},
        "sample": {"prompts": held_out_prompts(2), "every_n_steps": max(steps // 2, 1),
                   "sampler": {"type": SAMPLE_SETTINGS["sampler"]}, **sample},
        "output": {"dir": str(output / "run"), "name": "demo_lora", "save_every_n_epochs": None,
                   "save_state_every_n_epochs": None, "log_every": 10, "tensorboard": False},
    }


@dataclass
class DemoReport:
    grid: Path
    summary: Path
    before: dict[str, Any]
    after: dict[str, Any]


def _scores(models, seen: list[str], held: list[str]) -> tuple[dict[str, Any], list, list]:
    from anima_core.demo import scoring, shapes
    from anima_core.demo.evaluate import sample

    held_images, seen_images = sample(models, held), sample(models, seen)
    return ({"held_out_rate": round(scoring.concept_rate(held_images, shapes.HELD_OUT), 3),
             "seen": {k: round(v, 3) for k, v in scoring.score(seen_images, seen).as_dict().items()}},
            held_images, seen_images)


def report(output: Path, config, lora: Path) -> DemoReport:
    """Before/after figures of a finished demo run: the same prompts and seeds through the base alone and with the
    LoRA merged; writes the grid PNG and the summaries, returns the numbers."""
    from anima_core import atomic
    from anima_core.demo import shapes
    from anima_core.demo.evaluate import held_out_prompts, seen_prompts, write_grid
    from anima_core.model.models import AnimaModels

    output = Path(output)
    held, seen = held_out_prompts(), seen_prompts(8)
    models = AnimaModels.from_config(config, device="cpu")
    before, held_before, seen_before = _scores(models, seen, held)
    models.apply_lora(lora, 1.0)
    after, held_after, seen_after = _scores(models, seen, held)
    grid = write_grid([(f"base: {shapes.HELD_OUT}", held_before), (f"LoRA: {shapes.HELD_OUT}", held_after),
                       ("base: seen", seen_before), ("LoRA: seen", seen_after)], output / "before_after.png")
    lines = [
        f"anima train --demo: a LoRA teaching the unseen colour '{shapes.HELD_OUT}' to the tiny pretrained base",
        f"held-out prompts ({len(held)}, e.g. '{held[0]}'), share of samples that come out {shapes.HELD_OUT}:",
        f"  base {before['held_out_rate']:.0%}  ->  LoRA {after['held_out_rate']:.0%}",
        f"seen-concept prompts ({len(seen)}), accuracy base -> LoRA:",
        *(f"  {k:<9}{before['seen'][k]:.0%} -> {after['seen'][k]:.0%}" for k in ("colour", "shape", "position",
                                                                             "size")),
        f"LoRA: {lora}",
        f"grid: {grid} (rows: base / LoRA on the same prompts and seeds)",
    ]
    summary = output / "summary.txt"
    atomic.write_text(summary, "\n".join(lines) + "\n")
    atomic.write_text(output / "summary.json", json.dumps({"before": before, "after": after, "lora": str(lora),
                                                           "held_out": shapes.HELD_OUT, "held_out_prompts": held,
                                                           "seen_prompts": seen}, indent=2) + "\n")
    return DemoReport(grid, summary, before, after)
