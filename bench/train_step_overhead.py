"""Per-optimizer-step time of the real training loop (``anima_core.training.api.train``) vs a bare loop doing the
same model work (Qwen encode + DiT/adapter forward + backward + AdamW step) on the same batch size, measured in
one run on the demo base (the tiny *pretrained* model set packaged in anima_core.demo) and its shapes data. The loop's time per step is the slope between two run lengths, so start-up
(loading, caching) cancels out. Goal: ratio <= 1.05.

    python bench/train_step_overhead.py [--steps 20 --batch 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from anima_core.builtins.adapters import LoRAOptions
    from anima_core.lora import LoRAAdapter
    from anima_core.model.models import AnimaModels
    from anima_core.demo import base_model_paths, shapes
    from anima_core.training.api import train

    root = Path(tempfile.mkdtemp(prefix="anima-bench-"))
    tiny = base_model_paths()
    images = shapes.write_dataset(root / "data", 8)

    def cfg(out: Path, steps: int) -> dict:
        return {"model": {"transformer": str(tiny.transformer), "text_encoder": str(tiny.text_encoder),
                          "vae": str(tiny.vae), "qwen_tokenizer": str(tiny.qwen_tokenizer),
                          "t5_tokenizer": str(tiny.t5_tokenizer), "dtype": "fp32", "gradient_checkpointing": False},
                "dataset": {"path": str(images), "resolution": [64]},
                "adapter": {"rank": 8}, "train": {"max_steps": steps, "batch_size": args.batch,
                                                  "mixed_precision": "no"},
                "sample": {"baseline": False},
                "output": {"dir": str(out), "tensorboard": False, "save_every_n_epochs": None,
                           "save_state_every_n_epochs": None, "cache_dir": str(root / "cache")}}

    def loop_time(steps: int, i: int) -> float:
        t0 = time.perf_counter()
        train(cfg(root / f"run{steps}_{i}", steps))
        return time.perf_counter() - t0

    models = AnimaModels.load(tiny.transformer, tiny.text_encoder, tiny.vae, tiny.qwen_tokenizer, tiny.t5_tokenizer)
    adapter = LoRAAdapter(LoRAOptions(rank=8))
    adapter.inject(models.dit)
    opt = torch.optim.AdamW(adapter.get_param_groups(0.01))
    captions = ["red circle, top left, small"] * args.batch
    x0 = torch.randn(args.batch, 16, 1, 8, 8)

    def bare_time(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            text = models.text.tokenize(captions)
            hidden = models.text.encode_qwen(text)
            ctx = models.dit.condition(hidden, text.qwen_mask, text.t5_ids, text.t5_mask, text.t5_weights)
            t = torch.rand(args.batch)
            noise = torch.randn_like(x0)
            noisy = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
            loss = (models.dit(noisy, t, ctx) - (noise - x0)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps

    loop_per_step, bare_per_step = [], []
    loop_time(2, -1)  # warm imports and the latent cache
    for i in range(args.repeats):
        short, long = loop_time(2, i), loop_time(2 + args.steps, i)
        loop_per_step.append((long - short) / args.steps)
        bare_per_step.append(bare_time(args.steps))
    a, b = statistics.median(loop_per_step), statistics.median(bare_per_step)
    print(f"demo base, batch {args.batch}, {args.steps} steps x {args.repeats} repeats (CPU)")
    print(f"real loop {a * 1e3:.1f} ms/step, bare step {b * 1e3:.1f} ms/step, ratio {a / b:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
