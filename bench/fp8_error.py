"""fp8 base weights: output error of unscaled fp8 storage (diffusers' layerwise casting: ``weight.to(float8_e4m3fn)``
and back) vs our per-tensor scaled fp8 (``anima_core.model.fp8``: ``w ≈ q · amax/448``), both against the bf16
weights, on the full-size Anima DiT block's Linear shapes; plus the resident weight bytes. Measured side by side in
one run, on the CPU.

Weights are random with a realistic distribution: N(0, std²) (std 0.02 ≈ 1/√2048, the scale of a trained 2048-wide
DiT Linear) with a few outlier input columns (``--outlier-frac`` of the columns ×``--outlier-gain``), stored in
bf16 — the reference. Activations are N(0, 1) per channel with a few ×4 outlier channels, the scale after the
blocks' LayerNorm + AdaLN modulation (and of the adapter's RMS-normed context that cross-attention's K/V read).
Every product is computed in fp32, so the figures are the storage error alone; the bf16-compute row shows the
rounding that bf16 compute adds anyway (the noise floor a storage format should stay near).

1. Per Linear of one block (the 16 Linears of ``transformer_blocks.N``): relative output error
   ‖y − y_ref‖ / ‖y_ref‖ of (a) unscaled e4m3 (diffusers ``apply_layerwise_casting``, the real hook) and (b) our
   ``ScaledFp8Linear`` (via ``fp8.quantize_linears_``), the share of weights that land in e4m3's subnormal range
   (|·| < 2⁻⁶, 3 or fewer significant bits) in each format, and (a)/(b).
2. The same for one 2048×2048 Linear across weight scales: unscaled e4m3 stores |w| < 2⁻⁶ ≈ 0.0156 as subnormals
   (fixed steps of 2⁻⁹), so its error grows as the weights shrink (about half of N(0, 0.02²) is subnormal), while
   the scaled format's error does not depend on the scale; they meet only for large weights.
3. One real-shape DiT block end to end: ``CosmosTransformer3DModel`` at full width with one block, through
   ``AnimaDiT.forward`` at ``--latent``² (1024 tokens for 64), the block's Linears stored (a) and (b), output error.
4. Resident base-weight bytes of the full-size model (built on the meta device, exact): bf16 vs fp8 blocks.

    python bench/fp8_error.py [--std 0.02 --outlier-frac 0.005 --outlier-gain 8 --tokens 1024 --latent 64]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
SUBNORMAL = 2.0 ** -6  # smallest normal e4m3 value


def random_weight(out_f: int, in_f: int, std: float, frac: float, gain: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=gen) * std
    n = max(1, int(round(frac * in_f))) if frac > 0 else 0
    if n:
        cols = torch.randperm(in_f, generator=gen)[:n]
        w[:, cols] *= gain
    return w.to(torch.bfloat16)


def activations(tokens: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, in_f, generator=gen)
    x[:, torch.randperm(in_f, generator=gen)[: max(1, in_f // 200)]] *= 4.0
    return x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def unscaled_linear(ref: nn.Linear) -> nn.Linear:
    """The Linear under diffusers' layerwise casting: stored in e4m3 unscaled, computed in fp32."""
    from diffusers.hooks import apply_layerwise_casting

    lin = copy.deepcopy(ref)
    apply_layerwise_casting(lin, storage_dtype=E4M3, compute_dtype=torch.float32, skip_modules_pattern=())
    assert lin.weight.dtype == E4M3
    return lin


def scaled_linear(ref: nn.Linear):
    """Ours: ``ScaledFp8Linear`` through the same entry point the loader of a diffusers folder uses."""
    from anima_core.model import fp8

    holder = nn.Sequential(copy.deepcopy(ref))
    fp8.quantize_linears_(holder, torch.float32)
    return holder[0]


def subnormal_share(lin) -> float:
    """Share of stored e4m3 values below the smallest normal (in storage units, i.e. before the scale)."""
    w = lin.weight.float()
    return float(((w != 0) & (w.abs() < SUBNORMAL)).float().mean())


def compare(weight_bf16: torch.Tensor, x: torch.Tensor) -> dict:
    ref = nn.Linear(weight_bf16.shape[1], weight_bf16.shape[0], bias=False).requires_grad_(False)
    ref.weight.data = weight_bf16.float()  # the bf16 values, exactly, computed in fp32
    with torch.no_grad():
        y_ref = ref(x)
        y_bf16 = nn.functional.linear(x.bfloat16(), weight_bf16)  # bf16 compute: the noise floor
        a, b = unscaled_linear(ref), scaled_linear(ref)
        y_a, y_b = a(x), b(x)
    return {"a": rel(y_a, y_ref), "b": rel(y_b, y_ref), "floor": rel(y_bf16, y_ref),
            "sub_a": subnormal_share(a), "sub_b": subnormal_share(b),
            "zero_a": float(((a.weight.float() == 0) & (ref.weight != 0)).float().mean()),
            "w_a": rel(a.weight.float(), ref.weight), "w_b": rel(b.dequantized_weight(torch.float32), ref.weight)}


def full_size_model(layers: int):
    from diffusers import CosmosTransformer3DModel

    from anima_core.model.dit import DIT_FIXED, AnimaDiT

    dit = CosmosTransformer3DModel(in_channels=17, out_channels=16, num_attention_heads=16, attention_head_dim=128,
                                   num_layers=layers, mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256,
                                   concat_padding_mask=False, **DIT_FIXED)
    return AnimaDiT(dit, nn.Identity())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--outlier-frac", type=float, default=0.005)
    ap.add_argument("--outlier-gain", type=float, default=8.0)
    ap.add_argument("--tokens", type=int, default=1024, help="rows of the per-Linear activations")
    ap.add_argument("--latent", type=int, default=64, help="latent side of the block run (tokens = (side/2)²)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from anima_core.model import fp8
    from anima_core.model.dit import quantizes

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"weights N(0, {args.std}²) with {args.outlier_frac:.1%} outlier columns ×{args.outlier_gain}, stored "
          f"bf16 (reference); activations N(0, 1) with 0.5 % ×4 channels; all products in fp32")

    # 1. per Linear of one block
    with torch.device("meta"):
        block = full_size_model(1).transformer.transformer_blocks[0]
    linears = [(n, m.out_features, m.in_features) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    print(f"\n1. the {len(linears)} Linears of one full-size block, {args.tokens} tokens each")
    print(f"{'Linear':22} {'shape':>11} {'unscaled':>9} {'scaled':>8} {'ratio':>6} {'bf16 cmp':>8} "
          f"{'W err a':>8} {'W err b':>8} {'subnorm a':>9} {'subnorm b':>9}")
    tot = {"a": 0.0, "b": 0.0, "floor": 0.0}
    weight_elems = 0
    for name, out_f, in_f in linears:
        r = compare(random_weight(out_f, in_f, args.std, args.outlier_frac, args.outlier_gain, gen),
                    activations(args.tokens, in_f, gen))
        n = out_f * in_f
        weight_elems += n
        for k in tot:
            tot[k] += r[k] * n
        print(f"{name:22} {out_f:5}×{in_f:<5} {r['a']:9.4f} {r['b']:8.4f} {r['a'] / r['b']:6.2f} {r['floor']:8.4f} "
              f"{r['w_a']:8.4f} {r['w_b']:8.4f} {r['sub_a']:9.1%} {r['sub_b']:9.1%}")
    a, b, floor = (tot[k] / weight_elems for k in ("a", "b", "floor"))
    print(f"{'weighted by size':22} {'':11} {a:9.4f} {b:8.4f} {a / b:6.2f} {floor:8.4f}   "
          f"(unscaled / scaled output error: {a / b:.2f}×)")

    # 2. weight-scale sweep on one 2048×2048 Linear
    print("\n2. one 2048×2048 Linear across weight scales (same outliers): relative output error")
    print(f"{'std':>7} {'unscaled':>9} {'scaled':>8} {'ratio':>6} {'subnorm a':>9} {'zeroed a':>9} {'subnorm b':>9}")
    x = activations(args.tokens, 2048, gen)
    for std in (0.002, 0.005, 0.01, 0.02, 0.05, 0.1):
        r = compare(random_weight(2048, 2048, std, args.outlier_frac, args.outlier_gain, gen), x)
        print(f"{std:7.3f} {r['a']:9.4f} {r['b']:8.4f} {r['a'] / r['b']:6.2f} {r['sub_a']:9.1%} {r['zero_a']:9.1%} "
              f"{r['sub_b']:9.1%}")

    # 3. one real-shape block end to end
    tokens = (args.latent // 2) ** 2
    print(f"\n3. one full-size DiT block end to end (full-width patch embed, timestep embedder and final layer, "
          f"1 block), latent {args.latent}² = {tokens} tokens, 512-token context, fp32 compute")
    ref = full_size_model(1).float().eval().requires_grad_(False)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if p.dim() == 2:
                p.copy_(random_weight(*p.shape, args.std, args.outlier_frac if pname.startswith(
                    "transformer.transformer_blocks.") else 0.0, args.outlier_gain, gen).float())
            else:
                p.copy_((1.0 + 0.1 * torch.randn(p.shape, generator=gen)) if "norm" in pname
                        else 0.02 * torch.randn(p.shape, generator=gen))
            p.copy_(p.bfloat16().float())  # bf16 values
    from diffusers.hooks import apply_layerwise_casting

    unscaled = copy.deepcopy(ref)
    for m in unscaled.transformer.transformer_blocks.modules():
        if isinstance(m, nn.Linear):
            apply_layerwise_casting(m, storage_dtype=E4M3, compute_dtype=torch.float32, skip_modules_pattern=())
    scaled = copy.deepcopy(ref)
    count = fp8.quantize_linears_(scaled, torch.float32, quantizes)
    lat = torch.randn(1, 16, 1, args.latent, args.latent, generator=gen)
    ctx = torch.randn(1, 512, 1024, generator=gen)
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        y_ref, y_a, y_b = (m(lat, sigma, ctx) for m in (ref, unscaled, scaled))
    ea, eb = rel(y_a, y_ref), rel(y_b, y_ref)
    print(f"   {count} block Linears in fp8: velocity error unscaled {ea:.4f}, scaled {eb:.4f}, "
          f"ratio {ea / eb:.2f}×")

    # 4. bytes
    with torch.device("meta"):
        model = full_size_model(28)
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters())
    block_linear = sum(m.weight.numel() for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and quantizes(n))
    scales = len(fp8.replace_linears_(model, torch.bfloat16, quantizes))
    fp8_bytes = sum(p.numel() * (1 if p.dtype == E4M3 else 2) for p in model.parameters()) + 4 * scales
    print(f"\n4. full-size DiT (28 blocks; the adapter, 0.27 GB, stays bf16) base weights: bf16 {bf16_bytes / 1e9:.3f} "
          f"GB, fp8 blocks {fp8_bytes / 1e9:.3f} GB → {fp8_bytes / bf16_bytes:.3f}×; the {scales} block Linears "
          f"alone ({block_linear / 1e9:.3f} B weights): {(block_linear + 4 * scales) / (2 * block_linear):.4f}× "
          f"(1 byte each + one 4-byte scale per tensor, vs 2 bytes)")

if __name__ == "__main__":
    main()
