"""LoRA training step of the FULL-SIZE Anima architecture (random weights, no checkpoint needed) on one CUDA GPU:
1024² image (128² latent, 4096 DiT tokens), batch 1, bf16 weights + autocast, SDPA, 512-token context, rank-32
LoRA on the 280 default Linears, AdamW; gradient checkpointing off and on. Prints s/step, achieved TFLOP/s and
peak VRAM.

FLOPs assumed per step (stated, not measured): forward = 2·N_linear·T (every DiT Linear, T = 4096 tokens; the
512-token K/V projections of cross-attention counted at 512) + attention 4·T²·D (self) + 4·T·512·D (cross) per
block; backward through frozen weights ≈ one more forward (input gradients only; LoRA weight grads negligible).
So model FLOPs = 2 × forward; the recompute of checkpointing is not counted as useful work.

    python bench/gpu_step.py [--steps 10 --warmup 3 --resolution 1024]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step.py needs a CUDA GPU (the full-size model takes ~100 s per step on a 2-core CPU)")
        return 2

    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    from anima_core.builtins.adapters import LoRAOptions
    from anima_core.lora import LoRAAdapter
    from anima_core.model.dit import DIT_FIXED, AnimaDiT

    device = torch.device("cuda")
    torch.manual_seed(0)
    dit = CosmosTransformer3DModel(in_channels=17, out_channels=16, num_attention_heads=16, attention_head_dim=128,
                                   num_layers=28, mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256,
                                   concat_padding_mask=False, **DIT_FIXED)
    model = AnimaDiT(dit, AnimaTextConditioner()).to(device, torch.bfloat16)
    model.requires_grad_(False)
    adapter = LoRAAdapter(LoRAOptions(rank=args.rank, alpha=args.rank / 2))
    adapter.inject(model)
    opt = torch.optim.AdamW(adapter.get_param_groups(0.01), lr=1e-4)
    side = args.resolution // 8
    tokens = (side // 2) ** 2
    x = torch.randn(1, 16, 1, side, side, device=device, dtype=torch.bfloat16)
    ctx = torch.randn(1, 512, 1024, device=device, dtype=torch.bfloat16)
    fwd = dit_forward_flops(model, tokens, 512)
    print(f"{torch.cuda.get_device_name()}: Anima DiT {sum(p.numel() for p in dit.parameters()) / 1e9:.3f} B params, "
          f"{args.resolution}² ({tokens} tokens), LoRA rank {args.rank} on {len(adapter.network.loras)} Linears, "
          f"bf16, SDPA; model FLOPs/step = 2 × {fwd / 1e12:.2f} TFLOP")
    for ckpt in (False, True):
        model.set_gradient_checkpointing(ckpt)
        model.train()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.warmup + args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            t = torch.rand(1, device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, t, ctx)
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"gradient checkpointing {'on ' if ckpt else 'off'}: {step:.3f} s/step, "
              f"{2 * fwd / step / 1e12:.1f} TFLOP/s achieved, peak VRAM {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
