"""Loading the full-size Anima DiT + LLM adapter file (bf16, 685 tensors, 4.18 GB, official single-file layout
``net.blocks.N…`` / ``net.llm_adapter.…``): our loader vs a bare safetensors read of the same file, wall time and
peak RSS, measured side by side in one run.

1. A random file of the real architecture is written tensor by tensor (the safetensors header by hand, then each
   tensor's bytes as it is drawn), so this process never holds more than one tensor; ``--keep PATH`` writes it
   there (or reuses it if it is already there) instead of in a temp dir.
2. The file is read once end to end (warm-up), so every measurement below sees a warm page cache: the figures
   are the loaders' own cost, not the disk's.
3. Each row runs in a fresh child process (``python bench/load_memory.py --child KIND PATH``), which imports
   everything first, takes its RSS as the baseline, then times one load, up to the data really being in memory:
   one byte of every 4 KiB page of every resulting tensor is read (counted in the time), so a lazy (mmap) read
   is not flattered.
   - ``bare mmap+touch`` (the goal's reference): ``safetensors.torch.load_file(path)``, safetensors' default
     mmap backend: tensors are views of the page cache, nothing is copied.
   - ``bare mmap+copy``: the same, then every tensor ``.clone()``d into process memory (the "read + copy" of
     issue 16's first measurement).
   - ``bare pread``: ``load_file(path, backend="pread")``: each tensor read into fresh process memory.
   - ``bare mmap+build``: ``bare mmap`` then the least any loader of this model must add: the model built on the
     meta device, diffusers' key converter, ``load_state_dict(strict=True, assign=True)``.
   - ``ours bf16``: ``anima_core.model.dit.load_transformer(path, dtype=torch.bfloat16)`` (builds the model on
     the meta device, checks every key and shape, fills it).
   - ``ours fp8``: the same with ``base_precision="fp8"``: the 28 blocks' Linears are quantised at load, work
     that no bare row does.
   Peak RSS is the child's ``ru_maxrss`` (resident file-backed mmap pages count as well as anonymous memory);
   the figure compared is peak minus the post-import baseline, as a multiple of the file size. ``--repeats N``
   runs the rows interleaved N times and keeps each row's fastest load (sub-second rows are noisy on a shared
   machine).

Goals (issue 16 §1): ours / bare mmap+touch time ≤ 1.5×, (peak RSS − baseline) ≤ 1.2 × file size; PASS/FAIL per
row. The ratios against ``bare pread`` (the work of a copying loader) and ``bare mmap+build`` (the least work of
any loader that returns this model) are printed beside it.

    python bench/load_memory.py [--keep /path/anima-random-bf16.safetensors] [--repeats 3] [--rows bare,bf16,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_GOAL = 1.5
RSS_GOAL = 1.2
PAGE = 4096


def _rss_status() -> dict[str, int]:
    """Current VmRSS / RssAnon / RssFile of this process in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# -- the random full-size file --------------------------------------------------------------------------------
def full_size_configs() -> tuple[dict, dict]:
    """The Anima (Cosmos-Predict2-2B) DiT config as our loader infers it, and the adapter's (diffusers defaults)."""
    from anima_core.model.dit import DIT_FIXED

    dit = dict(in_channels=17, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28,
               mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, concat_padding_mask=False, **DIT_FIXED)
    adapter = dict(source_dim=1024, target_dim=1024, model_dim=1024, num_layers=6, num_attention_heads=16,
                   mlp_ratio=4.0, target_vocab_size=32128, use_self_attention=True)
    return dit, adapter


def official_layout_shapes() -> dict[str, tuple[int, ...]]:
    """{file key: shape} of the official single file, from the model built on the meta device (no data)."""
    import torch

    from anima_core.model.dit import _build
    from anima_core.model.names import original_anima_state_dict

    dit_cfg, adapter_cfg = full_size_configs()
    with torch.device("meta"):
        model = _build(dit_cfg, adapter_cfg)
    sd = original_anima_state_dict(model.transformer.state_dict(), model.text_conditioner.state_dict())
    return {k: tuple(v.shape) for k, v in sd.items()}


def write_random_file(path: Path, seed: int = 0) -> int:
    """Write the file tensor by tensor; returns its size. Weights ~ N(0, 0.02²), 1-D norm gains 1 + N(0, 0.1²),
    biases N(0, 0.02²), all bf16 (realistic magnitudes; the values do not matter to loading)."""
    import torch

    shapes = official_layout_shapes()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(path.suffix + ".partial")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for key, shape in shapes.items():
            t = torch.randn(shape, generator=gen, dtype=torch.float32)
            if len(shape) == 1 and not key.endswith("bias"):
                t.mul_(0.1).add_(1.0)
            else:
                t.mul_(0.02)
            fh.write(memoryview(t.to(torch.bfloat16).reshape(-1).view(torch.uint8).numpy()))
            del t
    os.replace(tmp, path)
    return path.stat().st_size


def warm_page_cache(path: Path) -> float:
    """Read the whole file once (discarding it) so the measured loads hit a warm page cache; returns seconds."""
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
    return time.perf_counter() - t0


def minimal_model(tensors: dict):
    """The least any loader of this model must do with the tensors of a bare read: build the model on the meta
    device, rename the DiT keys with diffusers' converter, ``load_state_dict(strict=True, assign=True)``."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    from anima_core.model.dit import ADAPTER_PREFIX, _build, infer_adapter_config, infer_dit_config
    from anima_core.model.meta_load import build_empty

    sd = {k.removeprefix("net."): v for k, v in tensors.items()}
    adapter_sd = {k[len(ADAPTER_PREFIX):]: v for k, v in sd.items() if k.startswith(ADAPTER_PREFIX)}
    dit_sd = {k: v for k, v in sd.items() if not k.startswith(ADAPTER_PREFIX)}
    model = build_empty(lambda: _build(infer_dit_config(dit_sd), infer_adapter_config(adapter_sd)))
    model.transformer.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(dit_sd), strict=True,
                                      assign=True)
    model.text_conditioner.load_state_dict(adapter_sd, strict=True, assign=True)
    return model


def touch(tensors) -> int:
    """Read one byte of every 4 KiB page of every tensor (forces a lazily mapped tensor into memory)."""
    import torch

    total = 0
    for t in tensors:
        flat = t.detach().reshape(-1).view(torch.uint8)
        total += int(flat[::PAGE].sum()) if flat.numel() else 0
    return total


# -- the children ---------------------------------------------------------------------------------------------
def child(kind: str, path: str) -> None:
    """One measured load in this (fresh) process; prints one JSON line."""
    t_import = time.perf_counter()
    import torch

    if kind.startswith("bare"):
        from safetensors.torch import load_file
    if kind == "bare-build" or not kind.startswith("bare"):
        from accelerate import init_empty_weights  # noqa: F401  (imported lazily by the loader otherwise)
        from diffusers import AnimaTextConditioner, CosmosTransformer3DModel  # noqa: F401
        from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers  # noqa

        from anima_core.model import fp8
        from anima_core.model.dit import load_transformer
    import_s = time.perf_counter() - t_import
    base = _rss_status()
    t0 = time.perf_counter()
    if kind.startswith("bare"):
        tensors = load_file(path, backend="pread" if kind == "bare-pread" else "mmap")
        if kind == "bare-copy":
            tensors = {k: tensors.pop(k).clone() for k in list(tensors)}
        if kind == "bare-build":
            model = minimal_model(tensors)
            tensors = dict(model.state_dict())
        touch(tensors.values())
        resident = sum(t.numel() * t.element_size() for t in tensors.values())
    else:
        model = load_transformer(path, dtype=torch.bfloat16, base_precision="fp8" if kind == "fp8" else "dtype")
        touch([*model.parameters(), *model.buffers()])
        resident = fp8.resident_weight_bytes(model)
    load_s = time.perf_counter() - t0
    end = _rss_status()
    build_s = float("nan")
    if not kind.startswith("bare"):  # after the measured load: the model construction alone, no data
        from anima_core.model.dit import build_empty_from_file

        t1 = time.perf_counter()
        build_empty_from_file(path, base_precision="fp8" if kind == "fp8" else "dtype", dtype=torch.bfloat16)
        build_s = time.perf_counter() - t1
    print(json.dumps({"kind": kind, "import_s": import_s, "load_s": load_s, "base_rss": base["VmRSS"],
                      "peak_rss": _peak_rss(), "end_anon": end.get("RssAnon", 0), "end_file": end.get("RssFile", 0),
                      "resident_bytes": resident, "build_s": build_s}))


def run_child(kind: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


ROWS = {"bare": "bare mmap+touch", "bare-copy": "bare mmap+copy", "bare-pread": "bare pread",
        "bare-build": "bare mmap+build",
        "bf16": "ours bf16", "fp8": "ours fp8"}


def report(rows: dict[str, dict], size: int) -> None:
    nan = {"load_s": float("nan")}
    bare, pread, built = rows.get("bare", nan), rows.get("bare-pread", nan), rows.get("bare-build", nan)
    print(f"\nfile {size / 1e9:.3f} GB; import time and baseline RSS are per child, load time excludes imports")
    print(f"{'row':16} {'import s':>8} {'load s':>7} {'/bare':>6} {'/pread':>6} {'/build':>6} {'base GB':>7} {'peak GB':>7} "
          f"{'over':>5} {'×file':>5} {'anon+file GB at end':>19} {'weights GB':>10} {'build s':>7}  goals: time / RSS")
    for kind, name in ROWS.items():
        if kind not in rows:
            continue
        r = rows[kind]
        over = r["peak_rss"] - r["base_rss"]
        ratio, mult = r["load_s"] / bare["load_s"], over / size
        verdict = "" if kind.startswith("bare") else (
            f"{'PASS' if ratio <= TIME_GOAL else 'FAIL'} (≤{TIME_GOAL}×) / "
            f"{'PASS' if mult <= RSS_GOAL else 'FAIL'} (≤{RSS_GOAL}×)")
        print(f"{name:16} {r['import_s']:8.1f} {r['load_s']:7.2f} {ratio:6.2f} {r['load_s'] / pread['load_s']:6.2f} "
              f"{r['load_s'] / built['load_s']:6.2f} "
              f"{r['base_rss'] / 1e9:7.2f} {r['peak_rss'] / 1e9:7.2f} {over / 1e9:5.2f} {mult:5.2f} "
              f"{r['end_anon'] / 1e9:9.2f} + {r['end_file'] / 1e9:<7.2f} {r['resident_bytes'] / 1e9:10.2f} {r['build_s']:7.2f}  {verdict}")
    print("(/bare = load time / bare mmap+touch time, which the goal uses; /pread = against safetensors' pread "
          "backend, which like a copying loader reads into process memory; /build = against bare mmap+build, the "
          "least any loader of this model does; ×file = (peak RSS − post-import RSS) / file size; "
          "anon+file = RssAnon + RssFile after the load; build s = building the empty model from the header alone (part "
          "of our load time, measured separately after it); fp8 also quantises 1.8 B weights, which no bare row does)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, help="write the random file here (reuse it if it exists)")
    ap.add_argument("--repeats", type=int, default=3, help="loads per row (the fastest one is reported)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    tmpdir = None
    if args.keep:
        path = args.keep
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="anima-load-bench-")
        path = Path(tmpdir.name) / "anima-random-bf16.safetensors"
    try:
        if path.exists():
            size = path.stat().st_size
            print(f"reusing {path} ({size / 1e9:.2f} GB)")
        else:
            t0 = time.perf_counter()
            size = write_random_file(path)
            print(f"wrote {path} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s; writer peak RSS "
                  f"{_peak_rss() / 1e9:.2f} GB (never the whole state dict)")
        print(f"warm-up read: {size / 1e9 / warm_page_cache(path):.2f} GB/s (page cache now warm for every row)")

        rows: dict[str, dict] = {}
        for _ in range(args.repeats):  # interleaved, so drift hits every row alike
            for kind in [k for k in ROWS if k in args.rows.split(",")]:
                r = run_child(kind, path)
                if kind not in rows or r["load_s"] < rows[kind]["load_s"]:
                    rows[kind] = r
        report(rows, size)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


if __name__ == "__main__":
    main()
