"""Data pipeline benchmark on the demo base (the tiny *pretrained* model set packaged in anima_core.demo), both
figures from one run:

(a) loader wait: time the training loop spends waiting for ``TrainingData.batches`` as a fraction of the step time,
    where a step is a forward + backward of the demo base's DiT on the batch (goal < 2 %);
(b) epoch time with the latent cache filled vs empty: build_training_data (scan, encode what is missing) plus one
    pass over the batches. The "cached" run clears the in-process scan memo first, so it pays what a new process
    pays: every image is still decoded once by the scan (goal >= 3x faster);
(c) the caching phase (``fill_cache``: find what is missing, encode it) in two fresh processes run one after the
    other on the same cache folder with different ``PYTHONHASHSEED`` values: the second must reuse every latent
    (the cache identity is a stable hash) and be >= 10x faster than the first.

    python bench/data_loader.py [--images 64 --size 128 --batch 4 --epochs 3] [--from-disk]

``--from-disk`` sets the in-memory latent budget to 0, so every batch reads its cache files (on the reader thread),
as for a dataset larger than the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_dataset(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    shapes = [(size, size), (size * 3 // 2, size), (size, size * 3 // 2), (size * 2, size)]
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        # smooth noise (upsampled) so PNG decoding costs what a photo-like image costs, not a flat colour's
        small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(root / f"img_{i:04d}.png")
        (root / f"img_{i:04d}.txt").write_text(f"tag{i % 7}, red, circle, {'large' if i % 2 else 'small'}")
    return root


def caching_child(data_dir: str, cache: str, size: int, batch: int) -> None:
    """One process's caching phase: prints {"seconds", "encoded", "reused"} as JSON."""
    from anima_core.data import DatasetSection, build_training_data
    from anima_core.data import loader
    from anima_core.demo import base_model_paths
    from anima_core.model.vae import load_vae

    timed = {}
    real_fill = loader.fill_cache

    def fill(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_fill(*args, **kwargs)
        timed["seconds"] = time.perf_counter() - t0
        return out

    loader.fill_cache = fill
    section = DatasetSection(path=Path(data_dir), resolution=[size], bucket_step=16, flip_aug=True)
    data = build_training_data(section, seed=0, batch_size=batch, cache_dir=Path(cache),
                               vae=load_vae(base_model_paths().vae), progress=False)
    print(json.dumps({**timed, "encoded": data.encoded, "reused": data.reused}))


def caching_across_processes(data_dir: Path, cache: Path, size: int, batch: int) -> tuple[dict, dict]:
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, __file__, "--caching-child", str(data_dir), str(cache), str(size),
                              str(batch)], capture_output=True, text=True, env=env, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  PYTHONHASHSEED={hash_seed}: caching phase {runs[-1]['seconds']:7.3f} s  "
              f"(encoded {runs[-1]['encoded']}, reused {runs[-1]['reused']})")
    return runs[0], runs[1]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--caching-child":
        caching_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--from-disk", action="store_true")
    args = ap.parse_args()

    from anima_core.data import DatasetSection, build_training_data
    from anima_core.data import images as data_images
    from anima_core.data import loader
    from anima_core.model.dit import load_transformer
    from anima_core.model.vae import load_vae
    from anima_core.demo import base_model_paths

    torch.manual_seed(0)
    if args.from_disk:
        loader.RAM_BUDGET_BYTES = 0
    root = Path(tempfile.mkdtemp(prefix="anima-bench-data-"))
    tiny = base_model_paths()
    data_dir = root / "data"
    data_dir.mkdir()
    write_dataset(data_dir, args.images, args.size)
    section = DatasetSection(path=data_dir, resolution=[args.size], bucket_step=16, shuffle_caption=True,
                             flip_aug=True)
    vae = load_vae(tiny.vae)
    cache = root / "cache"

    def epoch_time(label: str) -> float:
        data_images._probe_memo.clear()  # as a fresh process would start
        t0 = time.perf_counter()
        data = build_training_data(section, seed=0, batch_size=args.batch, cache_dir=cache, vae=vae, progress=False)
        for _ in data.batches(0):
            pass
        elapsed = time.perf_counter() - t0
        print(f"  {label:<9} {elapsed:7.3f} s  (encoded {data.encoded}, reused {data.reused})")
        return elapsed

    print(f"{args.images} images around {args.size} px, batch {args.batch}, flip_aug on, "
          f"{torch.get_num_threads()} torch threads, latents {'from disk' if args.from_disk else 'in memory'}")
    print("(b) epoch time, build + one pass over the batches:")
    uncached = epoch_time("uncached")
    cached = epoch_time("cached")

    dit = load_transformer(tiny.transformer)
    dit.requires_grad_(True).train()
    data = build_training_data(section, seed=0, batch_size=args.batch, cache_dir=cache, vae=None, progress=False)
    gen = torch.Generator().manual_seed(0)
    qwen_dim = dit.text_conditioner.config.source_dim

    def step(latents: torch.Tensor) -> None:
        b = latents.shape[0]
        hidden = torch.randn(b, 12, qwen_dim, generator=gen)
        ids = torch.randint(0, 100, (b, 8), generator=gen)
        ones = torch.ones(b, 8, dtype=torch.long)
        context = dit.condition(hidden, torch.ones(b, 12, dtype=torch.long), ids, ones, ones.float())
        t = torch.rand(b, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1, 1)
        loss = (dit((1 - tb) * latents + tb * noise, t, context) - (noise - latents)).pow(2).mean()
        loss.backward()
        dit.zero_grad(set_to_none=True)

    for batch in data.batches(99):  # warm up kernels and allocator on every bucket shape
        step(batch.latents)
    wait = work = 0.0
    n = 0
    for e in range(args.epochs):
        it = data.batches(e)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            if batch is None:
                break
            step(batch.latents)
            wait += t1 - t0
            work += time.perf_counter() - t1
            n += 1
    print("(c) caching phase in two fresh processes, different PYTHONHASHSEED, one new cache folder:")
    first, second = caching_across_processes(data_dir, root / "cache-processes", args.size, args.batch)

    print(f"(a) loader wait over {n} steps: {1e3 * wait / n:.3f} ms per batch vs step {1e3 * work / n:.2f} ms")
    print()
    print(f"loader wait / step time   = {100 * wait / work:6.2f} %   (goal < 2 %)")
    print(f"uncached / cached epoch   = {uncached / cached:6.2f} x   (goal >= 3 x)")
    print(f"1st / 2nd process caching = {first['seconds'] / second['seconds']:6.2f} x   (goal >= 10 x; the 2nd "
          f"encoded {second['encoded']}, goal 0)")


if __name__ == "__main__":
    main()
