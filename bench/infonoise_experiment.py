"""InfoNoise vs the baseline timestep sampler (an experiment, not a test): train the same adapter on the same
generated dataset for the same number of steps with core's ``logit_normal`` and with ``infonoise``, for several
seeds; evaluate every saved checkpoint on held-out images (velocity MSE averaged over a fixed grid of t with fixed
noise); print the held-out loss curves and the steps each run needs to reach a target loss.

The target is the baseline's mean final held-out loss plus ``--tolerance`` (1 %; ``--target`` sets it
directly): "steps to target" is the first checkpoint whose loss is at or below it ("-" if none is).

The model comes from ``_base_model`` alone (today the tiny random model set; switching to a pretrained demo base
is a change there). Needs anima-core and anima-infonoise installed.

    python bench/infonoise_experiment.py [--steps 160 --seeds 0 1 2 --eval-every 40]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

T_GRID = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)


def _base_model(args, root: Path):
    """Model paths (transformer, text_encoder, vae, qwen_tokenizer, t5_tokenizer attributes)."""
    from anima_core.testing.tiny import write_tiny_model_set

    return write_tiny_model_set(root / "model", seed=0)


def _datasets(args, root: Path) -> tuple[Path, Path]:
    from anima_core.testing.datasets import write_shapes_dataset

    train = write_shapes_dataset(root / "train", n=args.images, seed=1)
    held_out = write_shapes_dataset(root / "held_out", n=args.images, seed=2)
    return train, held_out


def _sampler(name: str, args) -> dict:
    if name == "baseline":
        return {"type": "logit_normal"}
    # The defaults need ~700 samples before the first refresh (README); a short bench run scales them down.
    return {"type": "infonoise", "bins": args.bins, "min_per_bin": args.min_per_bin,
            "warmup_steps": args.warmup, "refresh_every": args.refresh_every}


def _train(model, images: Path, out: Path, sampler: dict, seed: int, args) -> list[tuple[int, Path]]:
    from anima_core.testing.training import tiny_train_config
    from anima_core.training.api import train

    cfg = tiny_train_config(model, images, out, timestep_sampler=sampler,
                            optimizer={"type": "adamw", "lr": args.lr},
                            train={"max_steps": args.steps, "batch_size": args.batch_size, "seed": seed},
                            output={"save_every_n_steps": args.eval_every, "save_dtype": "fp32",
                                    "log_every": 10_000})
    train(cfg)
    return [(step, out / f"anima_lora_step{step:06d}.safetensors")
            for step in range(args.eval_every, args.steps + 1, args.eval_every)]


class HeldOut:
    """The held-out images' latents and prompts, with noise fixed once: every checkpoint sees the same problem."""

    def __init__(self, model, images: Path, root: Path, args) -> None:
        import torch
        from anima_core.data import build_training_data
        from anima_core.data.config import DatasetSection
        from anima_core.model.models import AnimaModels

        self.models = AnimaModels.load(model.transformer, model.text_encoder, model.vae, model.qwen_tokenizer,
                                       model.t5_tokenizer)
        data = build_training_data(DatasetSection(path=images, resolution=[64]), seed=0, batch_size=args.images,
                                   cache_dir=root / "eval-cache", vae=self.models.vae, progress=False)
        batch = next(iter(data.batches(0)))
        self.latents = batch.latents
        g = torch.Generator().manual_seed(1234)
        self.noise = [torch.randn(self.latents.shape, generator=g) for _ in T_GRID]
        with torch.no_grad():
            self.context = self.models.encode_prompts(batch.captions)

    def loss(self, lora: Path | None) -> float:
        import torch

        applied = self.models.apply_lora(lora, 1.0) if lora is not None else None
        total = 0.0
        with torch.no_grad():
            for t, noise in zip(T_GRID, self.noise):
                noisy = (1 - t) * self.latents + t * noise
                v = self.models.predict_velocity(noisy, torch.full((len(self.latents),), t), self.context)
                total += float((v - (noise - self.latents)).pow(2).mean())
        if applied is not None:
            applied.remove()
            self.models.loras.remove(applied)
        return total / len(T_GRID)


def _steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bins", type=int, default=16, help="infonoise K")
    ap.add_argument("--min-per-bin", type=int, default=4, help="infonoise N_min")
    ap.add_argument("--warmup", type=int, default=40, help="infonoise N_warm (optimizer steps)")
    ap.add_argument("--refresh-every", type=int, default=20, help="infonoise M")
    ap.add_argument("--target", type=float, default=None, help="held-out loss target (default: baseline's mean "
                                                                 "final loss × (1 + tolerance))")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--root", type=Path, default=None, help="work folder (default: a new temp folder)")
    args = ap.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="anima-infonoise-bench-"))
    started = time.time()
    model = _base_model(args, root)
    train_images, held_out_images = _datasets(args, root)
    held_out = HeldOut(model, held_out_images, root, args)
    untrained = held_out.loss(None)
    curves: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for seed in args.seeds:
        for name in ("baseline", "infonoise"):
            checkpoints = _train(model, train_images, root / f"{name}_seed{seed}", _sampler(name, args), seed, args)
            curves[(name, seed)] = [(step, held_out.loss(path)) for step, path in checkpoints]
            print(f"{name:9s} seed {seed}: " + " ".join(f"{s}:{v:.4f}" for s, v in curves[(name, seed)]),
                  flush=True)

    finals = {name: [curves[(name, s)][-1][1] for s in args.seeds] for name in ("baseline", "infonoise")}
    target = args.target
    if target is None:
        target = statistics.mean(finals["baseline"]) * (1 + args.tolerance)
    print(f"\nheld-out velocity MSE over t in {T_GRID} (untrained adapter: {untrained:.4f}); "
          f"{args.steps} steps, batch {args.batch_size}, {len(args.seeds)} seeds; target {target:.4f}")
    print(f"{'seed':>4} | {'baseline final':>14} | {'infonoise final':>15} | {'baseline steps':>14} | "
          f"{'infonoise steps':>15}")
    for seed in args.seeds:
        b, i = curves[("baseline", seed)], curves[("infonoise", seed)]
        sb, si = _steps_to(b, target), _steps_to(i, target)
        print(f"{seed:>4} | {b[-1][1]:>14.4f} | {i[-1][1]:>15.4f} | {sb if sb else '-':>14} | "
              f"{si if si else '-':>15}")
    steps = range(args.eval_every, args.steps + 1, args.eval_every)
    print("\nmean held-out loss per checkpoint (baseline / infonoise / ratio):")
    for k, step in enumerate(steps):
        b = statistics.mean(curves[("baseline", s)][k][1] for s in args.seeds)
        i = statistics.mean(curves[("infonoise", s)][k][1] for s in args.seeds)
        print(f"  step {step:>5}: {b:.4f} / {i:.4f} / {i / b:.3f}")
    print(f"\n{time.time() - started:.0f} s in all; work folder {root}")


if __name__ == "__main__":
    main()
