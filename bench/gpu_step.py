"""LoRA training step of the FULL-SIZE Anima architecture (random weights, no checkpoint needed) on one CUDA GPU,
across the low-VRAM settings (issue 16 §6): base precision bf16 / fp8, ``blocks_to_swap`` 0 / 14 / 28,
``train.compile`` on / off, gradient checkpointing on / off. 1024² image (128² latent, 4096 DiT tokens), batch 1,
rank-32 LoRA on the default targets, AdamW, bf16 autocast, SDPA, 512-token context through the LLM adapter. Prints
per row: s/step, achieved TFLOP/s, ``torch.cuda.max_memory_allocated`` over the step, the device memory held before
the first step, the base weights' bytes, and ``anima plan``'s estimate of the peak beside it.

Every row runs in a fresh child process (``--child``), so peaks, allocator caches and compile caches do not leak
from one row into the next, with its own timeout. The child builds the model as training does: the DiT + adapter
built on the meta device and given random bf16 weights (std 0.02; drawn on the GPU, then brought to the CPU, where
``load_transformer`` leaves a loaded model), then ``training/phases/models.py``'s sequence: fp8 via
``fp8.quantize_linears_(dit, dtype, dit.quantizes)`` (what ``base_precision: fp8`` applies at load), attention
backend, ``set_gradient_checkpointing``, the LoRA injected, ``TrainModule``, block swap via ``attach_block_swap``
(else ``.to(device)``), ``compile_blocks``. The step is the loop's: forward under autocast, fp32 MSE on the
velocity, backward, gradient clipping at 1.0, ``optimizer.step()``, ``zero_grad``. ``--warmup`` steps (compiling,
when on) are not timed; the median of ``--steps`` timed steps is reported.

Block swap needs gradient checkpointing (it refuses a grad-enabled forward without it), so GC off is only run with
swap 0. The default rows are the informative subset (~8 rows, sized for 10 minutes on one H200 with the default
``--budget``); ``--all`` runs every valid combination. Rows that would start past the budget are listed as skipped.

FLOPs assumed per step (stated, not measured): forward = 2·N_linear·T (every DiT Linear, T = 4096 tokens; the
512-token K/V projections of cross-attention counted at 512) + attention 4·T²·D (self) + 4·T·512·D (cross) per
block; backward through frozen weights ≈ one more forward (input gradients only; LoRA weight gradients and the
LLM adapter, ~1 % of the work, are not counted). So model FLOPs = 2 × forward; the recompute of checkpointing is
not counted as useful work.

Goals printed: swap 28 peak ≤ 2 GiB at ≤ +10 % step time vs swap 0 (bf16, GC on, eager); fp8 halves the
base-weight bytes (whole DiT + adapter: ≤ 0.55×, as the adapter, embeddings and final layer stay bf16; the block
Linears alone are 0.5×); plan within 10 % of the measured peak.

    python bench/gpu_step.py [--steps 5 --warmup 2 --resolution 1024 --rank 32 --budget 540] [--all | --select 4,6]
    python bench/gpu_step.py --tiny --device cpu      # dry run of the orchestration on a tiny model, on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

GIB = 2 ** 30
SWAP_GOAL_BYTES = 2 * GIB
SWAP_TIME_GOAL = 1.10
FP8_BYTES_GOAL = 0.55
PLAN_GOAL = 0.10
FULL_BLOCKS = 28


@dataclass(frozen=True)
class Row:
    precision: str  # "bf16" | "fp8"
    swap: int  # blocks_to_swap, for the full-size 28-block model (scaled for --tiny)
    compile: bool
    gc: bool

    @property
    def label(self) -> str:
        return (f"{self.precision:4} swap {self.swap:2} {'compile' if self.compile else 'eager  '} "
                f"GC {'on ' if self.gc else 'off'}")


DEFAULT_ROWS = (
    Row("bf16", 0, False, False),
    Row("bf16", 0, False, True),
    Row("bf16", 14, False, True),
    Row("bf16", 28, False, True),
    Row("fp8", 0, False, True),
    Row("fp8", 28, False, True),
    Row("bf16", 0, True, True),
    Row("fp8", 28, True, True),
)


def all_rows() -> tuple[Row, ...]:
    return tuple(Row(p, s, c, g) for p in ("bf16", "fp8") for s in (0, 14, 28) for c in (False, True)
                 for g in (False, True) if g or s == 0)


# -- the plan ---------------------------------------------------------------------------------------------------
def plan_config(row: Row, args) -> dict:
    """The training config of a row (the sections ``anima plan`` reads)."""
    return {"model": {"dtype": "bf16", "base_precision": row.precision if row.precision == "fp8" else "bf16",
                      "blocks_to_swap": row.swap, "gradient_checkpointing": row.gc, "attention": "sdpa"},
            "train": {"compile": row.compile, "mixed_precision": "bf16", "batch_size": 1, "grad_clip": 1.0},
            "dataset": {"resolution": args.resolution, "cache_latents": True, "cache_text_encoder": True},
            "adapter": {"type": "lora", "rank": args.rank, "alpha": args.rank / 2},
            "optimizer": {"type": "adamw", "lr": 1e-4, "weight_decay": 0.01}}


def plan_estimate(row: Row, args) -> int | None:
    """``anima plan``'s device-peak estimate (bytes) for the row on the published anima-2b shapes, or None.

    The one place to wire the planner: it expects ``anima_core.planning.plan.estimate_device_peak(config,
    architecture="anima-2b") -> int`` (or an object with ``.total`` / ``.peak_bytes``). Anything else (module not
    there yet, other signature, an error) prints as "n/a"."""
    if args.tiny:
        return None  # the tiny model is not a published architecture
    try:
        from anima_core.planning import plan as planner  # type: ignore[attr-defined]

        fn = getattr(planner, "estimate_device_peak")
        result = fn(plan_config(row, args), architecture="anima-2b")
        for attr in ("total", "peak_bytes", "device_peak"):
            if hasattr(result, attr):
                result = getattr(result, attr)
                break
        return int(result)
    except Exception:  # noqa: BLE001 - the planner is being written; any failure is "n/a"
        return None


# -- one row, in a child ----------------------------------------------------------------------------------------
def configs(tiny: bool) -> tuple[dict, dict]:
    from anima_core.model.dit import DIT_FIXED

    if tiny:
        dit = dict(in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=4,
                   mlp_ratio=4.0, text_embed_dim=64, adaln_lora_dim=16, concat_padding_mask=False, **DIT_FIXED)
        adapter = dict(source_dim=64, target_dim=64, model_dim=64, num_layers=1, num_attention_heads=2,
                       mlp_ratio=4.0, target_vocab_size=128, use_self_attention=True)
    else:
        dit = dict(in_channels=17, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28,
                   mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, concat_padding_mask=False, **DIT_FIXED)
        adapter = dict(source_dim=1024, target_dim=1024, model_dim=1024, num_layers=6, num_attention_heads=16,
                       mlp_ratio=4.0, target_vocab_size=32128, use_self_attention=True)
    return dit, adapter


def random_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    """The DiT + adapter with random weights in ``dtype`` on the CPU, as ``load_transformer`` returns a model:
    built on the meta device, values drawn on ``device`` (fast on a GPU), then brought to the CPU."""
    from anima_core.model.dit import _build
    from anima_core.model.meta_load import build_empty

    dit_cfg, adapter_cfg = configs(tiny)
    model = build_empty(lambda: _build(dit_cfg, adapter_cfg))
    gen = torch.Generator(device=device).manual_seed(0)
    values = {}
    for name, p in model.named_parameters():
        value = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
        if p.dim() == 1:
            value = 1.0 + 0.1 * value if "norm" in name else 0.02 * value
        else:
            value *= 0.02
        values[name] = value.to(dtype).cpu()
    missing, unexpected = model.load_state_dict(values, strict=False, assign=True)
    assert not unexpected and all(not k.endswith((".weight", ".bias")) for k in missing), (missing, unexpected)
    from anima_core.model import fp8

    fp8.cast_floating_(model, dtype)  # the RoPE and other buffers, as the loader leaves them
    return model


def dit_forward_flops(model, tokens: int, context: int) -> float:
    dit = model.transformer
    d = dit.config.num_attention_heads * dit.config.attention_head_dim
    flops = 0.0
    for name, mod in dit.named_modules():
        if isinstance(mod, torch.nn.Linear):
            rows = context if (".attn2.to_k" in name or ".attn2.to_v" in name) else tokens
            flops += 2.0 * mod.in_features * mod.out_features * rows
    blocks = dit.config.num_layers
    flops += blocks * (4.0 * tokens * tokens * d + 4.0 * tokens * context * d)
    return flops


def child(spec: dict) -> dict:
    from anima_core.builtins.adapters import LoRAOptions
    from anima_core.lora import LoRAAdapter
    from anima_core.model import fp8
    from anima_core.model.dit import quantizes
    from anima_core.model.text_encoder import TextBatch
    from anima_core.training.phases.optimizer import _param_groups
    from anima_core.training.train_module import TrainModule

    row, tiny = Row(**spec["row"]), spec["tiny"]
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    t_setup = time.perf_counter()
    dit = random_model(tiny, device, dtype)
    blocks = len(dit.transformer.transformer_blocks)
    swap = row.swap if not tiny else round(row.swap * blocks / FULL_BLOCKS)
    if row.precision == "fp8":
        fp8.quantize_linears_(dit, dtype, quantizes)  # what load_transformer(base_precision="fp8") applies
    base_bytes = fp8.resident_weight_bytes(dit)
    dit.requires_grad_(False)
    dit.eval()
    # training/phases/models.py, in its order
    dit.set_attention_backend("sdpa")
    dit.set_gradient_checkpointing(row.gc)
    adapter = LoRAAdapter(LoRAOptions(rank=spec["rank"], alpha=spec["rank"] / 2))
    torch.manual_seed(0x5EED)
    adapter.inject(dit)
    train_module = TrainModule(dit, adapter)
    if swap:
        from anima_core.model.block_swap import attach_block_swap

        attach_block_swap(dit, swap, device)
        train_module.adapter_modules.to(device)
    else:
        train_module.to(device)
    if row.compile:
        from anima_core.model.compile import compile_blocks

        compile_blocks(dit)
    train_module.train()
    groups = _param_groups(adapter, 0.01)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=1e-4)

    side = spec["resolution"] // 8
    tokens = (side // 2) ** 2
    ctx_dim = dit.text_conditioner.config.source_dim
    ctx_len = 512
    gen = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randn(1, 16, 1, side, side, generator=gen, device=device)
    noise = torch.randn(1, 16, 1, side, side, generator=gen, device=device)
    hidden = torch.randn(1, ctx_len, ctx_dim, generator=gen, device=device).to(dtype)
    ones = torch.ones(1, ctx_len, dtype=torch.long, device=device)
    text = TextBatch(torch.zeros_like(ones), ones, torch.zeros_like(ones), ones,
                     torch.ones(1, ctx_len, device=device))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    setup_s = time.perf_counter() - t_setup
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    else:
        held = 0
    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        sync()
        t0 = time.perf_counter()
        t = torch.rand(1, generator=gen, device=device)
        tb = t.view(-1, 1, 1, 1, 1)
        noisy = (1.0 - tb) * x0 + tb * noise
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = train_module(noisy.to(dtype), t, hidden, text)
        loss = (pred.float() - (noise - x0)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    timed = times[spec["warmup"]:]
    return {"row": asdict(row), "swap_blocks": swap, "blocks": blocks, "step_s": statistics.median(timed),
            "first_step_s": times[0], "setup_s": setup_s,
            "peak": torch.cuda.max_memory_allocated(device) if cuda else None, "held": held,
            "base_bytes": base_bytes, "flops_fwd": dit_forward_flops(dit, tokens, ctx_len), "tokens": tokens,
            "loss": losses[-1], "finite": all(math.isfinite(v) for v in losses),
            "params": sum(p.numel() for p in dit.transformer.parameters())}


# -- the parent -------------------------------------------------------------------------------------------------
def run_plans(rows, args, left: float) -> tuple[dict, str]:
    """Every row's plan estimate, computed in one child process within what is left of the budget."""
    if args.tiny:
        return {row: None for row in rows}, "plan: n/a (no plan for the tiny model)"
    if left < 30:
        return {row: None for row in rows}, "plan: n/a (no budget left to run it)"
    spec = {"rows": [asdict(r) for r in rows], "rank": args.rank, "resolution": args.resolution}
    try:
        proc = subprocess.run([sys.executable, __file__, "--plan-child", json.dumps(spec)], capture_output=True,
                              text=True, timeout=left)
        values = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("[")][-1])
    except subprocess.TimeoutExpired:
        return {row: None for row in rows}, f"plan: n/a (timed out after {left:.0f} s)"
    except (IndexError, ValueError):
        return {row: None for row in rows}, "plan: n/a (the plan process failed)"
    plans = dict(zip(rows, values))
    missing = all(v is None for v in values)
    return plans, ("plan: n/a (anima_core.planning.plan.estimate_device_peak is not available yet)" if missing
                   else "")


def plan_child(spec: dict) -> list:
    args = argparse.Namespace(tiny=False, rank=spec["rank"], resolution=spec["resolution"])
    return [plan_estimate(Row(**r), args) for r in spec["rows"]]


def run_row(row: Row, args, timeout: float) -> dict:
    spec = {"row": asdict(row), "tiny": args.tiny, "device": args.device, "rank": args.rank,
            "resolution": args.resolution, "steps": args.steps, "warmup": args.warmup}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="anima-gpu-step-") as cache:
        # A fresh inductor/triton cache per row: a compiled row pays its whole compile, as a first run does.
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"rc {proc.returncode}: " + " | ".join(tail)[-400:], "wall_s": wall}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    return result


UNIT = {"name": "GiB", "bytes": GIB}  # MiB for --tiny


def fmt_bytes(n) -> str:
    return "—" if n is None else f"{n / UNIT['bytes']:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (4 blocks; swap 14/28 → 2/4): a dry run")
    ap.add_argument("--all", action="store_true", help="every valid combination instead of the default rows")
    ap.add_argument("--select", help="comma-separated 1-based indices into the row list (e.g. 4,6 to rerun two)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all rows; later rows are skipped")
    ap.add_argument("--row-timeout", type=float, default=150.0, help="seconds per eager row")
    ap.add_argument("--compile-timeout", type=float, default=240.0, help="seconds per compiled row")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.plan_child:
        print(json.dumps(plan_child(json.loads(args.plan_child))))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_step.py needs a CUDA GPU (the full-size model takes ~100 s per step on a 2-core CPU); "
              "for a dry run of the orchestration: python bench/gpu_step.py --tiny --device cpu")
        return 2
    if args.tiny:
        UNIT.update(name="MiB", bytes=2 ** 20)
        if args.resolution == 1024:
            args.resolution = 128  # 16² latent, 64 tokens
    rows = all_rows() if args.all else DEFAULT_ROWS
    if args.select:
        rows = tuple(rows[int(i) - 1] for i in args.select.split(","))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{name}: {'tiny (4 blocks)' if args.tiny else 'full-size'} Anima DiT + adapter, {args.resolution}², "
          f"bs 1, LoRA rank {args.rank}, AdamW, bf16 autocast, SDPA; {args.warmup} warm-up + {args.steps} timed "
          f"steps per row, each row a fresh process; budget {args.budget:.0f} s")
    start = time.perf_counter()
    results: dict[Row, dict] = {}
    for row in rows:
        timeout = args.compile_timeout if row.compile else args.row_timeout
        left = args.budget - (time.perf_counter() - start)
        if left < min(timeout, 60.0):
            results[row] = {"error": "skipped (budget)"}
        else:
            results[row] = run_row(row, args, min(timeout, left))
        r = results[row]
        print(f"  ran {row.label}: " + (r["error"] if "error" in r else
                                           f"{r['step_s']:.3f} s/step, {r['wall_s']:.0f} s wall"), flush=True)
    plans, plan_note = run_plans(rows, args, args.budget - (time.perf_counter() - start))

    u = UNIT["name"]
    print(f"\n{'row':34} {'s/step':>7} {'TFLOP/s':>8} {'peak ' + u:>8} {'held ' + u:>8} {'base ' + u:>8} "
          f"{'plan ' + u:>8} {'plan/peak':>9} {'1st step s':>10} {'loss':>8}")
    for row in rows:
        r = results[row]
        if "error" in r:
            print(f"{row.label:34} {r['error']}")
            continue
        tflops = 2 * r["flops_fwd"] / r["step_s"] / 1e12
        plan = plans[row]
        ratio = f"{plan / r['peak']:9.3f}" if plan and r["peak"] else f"{'n/a':>9}"
        print(f"{row.label:34} {r['step_s']:7.3f} {tflops:8.3g} {fmt_bytes(r['peak']):>8} {fmt_bytes(r['held']):>8} "
              f"{fmt_bytes(r['base_bytes']):>8} {('n/a' if plan is None else fmt_bytes(plan)):>8} {ratio} "
              f"{r['first_step_s']:10.2f} {r['loss']:8.4f}{'' if r['finite'] else ' NON-FINITE'}")
    if plan_note:
        print(plan_note)

    print("\ngoals:")
    ok = {k: v for k, v in results.items() if "error" not in v}

    def get(precision, swap, compile_=False, gc=True):
        return ok.get(Row(precision, swap, compile_, gc))

    s0, s28 = get("bf16", 0), get("bf16", 28)
    if s0 and s28:
        t_ratio = s28["step_s"] / s0["step_s"]
        peak = s28["peak"]
        peak_ok = peak is not None and peak <= SWAP_GOAL_BYTES
        print(f"  swap 28 (bf16, GC on): peak {fmt_bytes(peak)} {u} (goal ≤ 2 GiB: "
              f"{'PASS' if peak_ok else ('n/a' if peak is None else 'FAIL')}), step time {t_ratio:.3f}× swap 0 "
              f"(goal ≤ {SWAP_TIME_GOAL}×: {'PASS' if t_ratio <= SWAP_TIME_GOAL else 'FAIL'})")
    else:
        print("  swap 28 vs swap 0: n/a (a row is missing)")
    b, f = get("bf16", 0), get("fp8", 0)
    if b and f:
        ratio = f["base_bytes"] / b["base_bytes"]
        held = (f"; device memory held before the first step {f['held'] / b['held']:.3f}×"
                if b["held"] else "")
        print(f"  fp8 base weights: {ratio:.3f}× the bf16 bytes (goal ≤ {FP8_BYTES_GOAL}×: "
              f"{'PASS' if ratio <= FP8_BYTES_GOAL else 'FAIL'}){held}")
    else:
        print("  fp8 vs bf16 base bytes: n/a (a row is missing)")
    within = [abs(plans[row] / r["peak"] - 1) for row, r in ok.items() if plans.get(row) and r["peak"]]
    if within:
        worst = max(within)
        print(f"  plan vs measured peak: worst {worst:.1%} off over {len(within)} rows (goal ≤ {PLAN_GOAL:.0%}: "
              f"{'PASS' if worst <= PLAN_GOAL else 'FAIL'})")
    else:
        print("  plan vs measured peak: n/a")
    print("  (held = device memory allocated before the first step: weights, LoRA, inputs; peak = "
          "max_memory_allocated over the warm-up and timed steps; base = the DiT + adapter weights' bytes before "
          "placement; 1st step = the first warm-up step, compile included)")
    if args.tiny:
        print("  (tiny model: the fp8 ratio is dominated by the layers that stay bf16; CPU rows have no device peak)")
    print(f"total {time.perf_counter() - start:.0f} s")
    failed = [row for row in rows if "error" in results[row] and results[row]["error"] != "skipped (budget)"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
