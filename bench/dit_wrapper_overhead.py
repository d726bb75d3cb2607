"""DiT forward+backward through anima's wrapper (AnimaDiT: zero mask channel, context handling) vs calling the
bare diffusers CosmosTransformer3DModel on the same input. Runs are interleaved and the medians compared, so
machine noise hits both sides alike. Goal: ratio <= 1.02.

    python bench/dit_wrapper_overhead.py [--hidden 256 --layers 4 --latent 32 --repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from anima_core.model.dit import DIT_FIXED, _build

    torch.manual_seed(0)
    head_dim = args.hidden // args.heads
    dit_cfg = dict(in_channels=17, out_channels=16, num_attention_heads=args.heads, attention_head_dim=head_dim,
                   num_layers=args.layers, mlp_ratio=4.0, text_embed_dim=64, adaln_lora_dim=32,
                   concat_padding_mask=False, **DIT_FIXED)
    adapter_cfg = dict(source_dim=64, target_dim=64, model_dim=64, num_layers=1, num_attention_heads=2,
                       target_vocab_size=128)
    model = _build(dit_cfg, adapter_cfg).to(args.device)
    bare = model.transformer
    x = torch.randn(1, 16, 1, args.latent, args.latent, device=args.device)
    sigma = torch.rand(1, device=args.device)
    ctx = torch.randn(1, 512, 64, device=args.device)
    mask = torch.zeros(1, 1, 1, args.latent, args.latent, device=args.device)

    def wrapped() -> None:
        model(x, sigma, ctx).float().pow(2).mean().backward()

    def direct() -> None:
        bare(hidden_states=x, timestep=sigma, encoder_hidden_states=ctx, condition_mask=mask,
             return_dict=False)[0].float().pow(2).mean().backward()

    def timed(fn) -> float:
        model.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in (wrapped, direct, wrapped, direct):  # warm-up
        timed(fn)
    a, b = [], []
    for _ in range(args.repeats):
        a.append(timed(wrapped))
        b.append(timed(direct))
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"device {args.device}, hidden {args.hidden}, layers {args.layers}, latent {args.latent}²")
    print(f"wrapper fwd+bwd median {ma * 1e3:.1f} ms, bare diffusers {mb * 1e3:.1f} ms, ratio {ma / mb:.3f} "
          f"(goal <= 1.02)")


if __name__ == "__main__":
    main()
