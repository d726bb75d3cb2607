"""InfoNoise vs the baseline timestep sampler on the demo task (an experiment, not a test): for several seeds,
train the ``anima train --demo`` LoRA (the packaged tiny *pretrained* base learning the colour it never saw,
``purple``) with core's ``logit_normal`` and with ``infonoise``, same data and steps; evaluate every saved
checkpoint on held-out purple images (velocity MSE averaged over a fixed grid of t with fixed noise) and by the
share of held-out-colour prompts whose samples come out purple (``anima_core.demo.scoring``); print the curves and
the steps each run needs to reach a target.

Loss target: the baseline's mean final held-out loss plus ``--tolerance`` (1 %; ``--target`` sets it directly).
Rate target: ``--rate-target`` (0.75). "Steps to target" is the first checkpoint at or past it ("-" if none is).

Needs anima-core and anima-infonoise installed.

    python bench/infonoise_experiment.py [--steps 300 --seeds 0 1 2 --eval-every 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

T_GRID = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
NAMES = ("baseline", "infonoise")


def _held_out_images(args, root: Path) -> Path:
    """Fresh purple images (a seed the demo's training set does not use)."""
    from anima_core.demo import shapes

    return shapes.write_dataset(root / "held_out", args.images, seed=1000, colours=[shapes.HELD_OUT])


def _sampler(name: str, args) -> dict:
    if name == "baseline":
        return {"type": "logit_normal"}
    # The defaults need ~700 samples and 200 steps of warm-up before the first refresh (README); a run of a few
    # hundred steps scales them down.
    return {"type": "infonoise", "bins": args.bins, "min_per_bin": args.min_per_bin,
            "warmup_steps": args.warmup, "refresh_every": args.refresh_every}


def _train(out: Path, sampler: dict, seed: int, args) -> list[tuple[int, Path]]:
    from anima_core.training.api import train
    from anima_core.training.demo import demo_config

    cfg = demo_config(out, steps=args.steps)  # the demo's base, data, adapter and optimizer
    cfg["timestep_sampler"] = sampler
    cfg["train"].update(seed=seed, batch_size=args.batch_size)
    cfg["sample"]["prompts"] = []  # the bench samples checkpoints itself
    cfg["output"].update(name="bench", save_every_n_steps=args.eval_every, save_dtype="fp32", log_every=10_000)
    train(cfg)
    return [(step, out / "run" / f"bench_step{step:06d}.safetensors")
            for step in range(args.eval_every, args.steps + 1, args.eval_every)]


class HeldOut:
    """The held-out images' latents and prompts, with noise fixed once: every checkpoint sees the same problem."""

    def __init__(self, model, images: Path, root: Path, args) -> None:
        import torch
        from anima_core.data import build_training_data
        from anima_core.data.config import DatasetSection
        from anima_core.demo.evaluate import held_out_prompts
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
        self.prompts = held_out_prompts(args.prompts)

    def measure(self, lora: Path | None) -> tuple[float, float]:
        """(held-out velocity MSE, share of held-out-colour prompts sampled in that colour)."""
        import torch
        from anima_core.demo import scoring, shapes
        from anima_core.demo.evaluate import sample

        applied = self.models.apply_lora(lora, 1.0) if lora is not None else None
        total = 0.0
        with torch.no_grad():
            for t, noise in zip(T_GRID, self.noise):
                noisy = (1 - t) * self.latents + t * noise
                v = self.models.predict_velocity(noisy, torch.full((len(self.latents),), t), self.context)
                total += float((v - (noise - self.latents)).pow(2).mean())
        rate = scoring.concept_rate(sample(self.models, self.prompts), shapes.HELD_OUT)
        if applied is not None:
            applied.remove()
            self.models.loras.remove(applied)
        return total / len(T_GRID), rate


def _first(curve: list[tuple[int, float]], reached) -> int | None:
    return next((step for step, value in curve if reached(value)), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (the demo's default)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--images", type=int, default=16, help="held-out purple images for the loss")
    ap.add_argument("--prompts", type=int, default=16, help="held-out-colour prompts sampled per checkpoint")
    ap.add_argument("--bins", type=int, default=16, help="infonoise K")
    ap.add_argument("--min-per-bin", type=int, default=4, help="infonoise N_min")
    ap.add_argument("--warmup", type=int, default=40, help="infonoise N_warm (optimizer steps)")
    ap.add_argument("--refresh-every", type=int, default=20, help="infonoise M")
    ap.add_argument("--target", type=float, default=None, help="held-out loss target (default: baseline's mean "
                                                                 "final loss × (1 + tolerance))")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--rate-target", type=float, default=0.75, help="held-out-colour rate target")
    ap.add_argument("--root", type=Path, default=None, help="work folder (default: a new temp folder)")
    args = ap.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="anima-infonoise-bench-"))
    started = time.time()
    from anima_core.demo import base_model_paths

    model = base_model_paths()
    held_out = HeldOut(model, _held_out_images(args, root), root, args)
    untrained_loss, untrained_rate = held_out.measure(None)
    curves: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    for seed in args.seeds:
        for name in NAMES:
            checkpoints = _train(root / f"{name}_seed{seed}", _sampler(name, args), seed, args)
            curves[(name, seed)] = [(step, *held_out.measure(path)) for step, path in checkpoints]
            print(f"{name:9s} seed {seed}: " + " ".join(f"{s}:{v:.4f}/{r:.2f}" for s, v, r in curves[(name, seed)]),
                  flush=True)

    target = args.target
    if target is None:
        target = statistics.mean(curves[("baseline", s)][-1][1] for s in args.seeds) * (1 + args.tolerance)
    print(f"\ndemo task ({args.steps} steps, batch {args.batch_size}, {len(args.seeds)} seeds). Untrained: held-out "
          f"velocity MSE {untrained_loss:.4f} over t in {T_GRID}, purple rate {untrained_rate:.2f} "
          f"({args.prompts} prompts)")
    print(f"steps to target: loss ≤ {target:.4f} | purple rate ≥ {args.rate_target:.2f}")
    print(f"{'seed':>4} | {'baseline loss':>13} | {'infonoise loss':>14} | {'baseline rate':>13} | "
          f"{'infonoise rate':>14}")
    for seed in args.seeds:
        cells = []
        for column, reached in ((1, lambda v: v <= target), (2, lambda v: v >= args.rate_target)):
            for name in NAMES:
                hit = _first([(c[0], c[column]) for c in curves[(name, seed)]], reached)
                cells.append(str(hit) if hit else "-")
        print(f"{seed:>4} | {cells[0]:>13} | {cells[1]:>14} | {cells[2]:>13} | {cells[3]:>14}")
    print("\nmean over seeds per checkpoint: held-out loss baseline / infonoise (ratio) | purple rate baseline / "
          "infonoise")
    for k, step in enumerate(range(args.eval_every, args.steps + 1, args.eval_every)):
        loss = [statistics.mean(curves[(n, s)][k][1] for s in args.seeds) for n in NAMES]
        rate = [statistics.mean(curves[(n, s)][k][2] for s in args.seeds) for n in NAMES]
        print(f"  step {step:>5}: {loss[0]:.4f} / {loss[1]:.4f} ({loss[1] / loss[0]:.3f}) | "
              f"{rate[0]:.2f} / {rate[1]:.2f}")
    print(f"\n{time.time() - started:.0f} s in all; work folder {root}")


if __name__ == "__main__":
    main()
