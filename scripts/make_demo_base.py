"""Make the demo base model set packaged in ``anima_core/demo/base/`` (``anima train --demo`` starts from it).

On the CPU, with fixed seeds:

1. a procedural shapes dataset (``anima_core.demo.shapes``) **without** the held-out colour (purple);
2. the VAE (``AutoencoderKLQwenImage``, Wan layout, small ``base_dim``) as an autoencoder whose latents *after*
   the loader's normalisation with the fixed Qwen-Image mean/std are about unit scale: a per-channel moment
   penalty acts on the normalised posterior means and the decoder trains on them plus small noise, so the DiT
   later sees N(0, 1)-like inputs and the decoder tolerates its imperfect outputs;
3. the DiT + LLM adapter (``CosmosTransformer3DModel`` + ``AnimaTextConditioner``) by rectified flow on the VAE
   latents, with the trainer's own conventions (x_t = (1 − t)·x0 + t·ε, target ε − x0, core's logit-normal t
   sampler, core's text encoding) and a frozen random tiny Qwen3;
4. the files in the official formats (``anima_core.testing.tiny.write_model_files``), then a check through the
   real loaders: generated samples of seen concepts scored by ``anima_core.demo.scoring``.

Run from the repository root:  python scripts/make_demo_base.py            (full run, ~40 min on 2 shared cores)
                               python scripts/make_demo_base.py --quick    (pipeline check, ~3 min; other --out)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from anima_core.demo import shapes
from anima_core.demo.base import BASE_DIR, FILE_NAMES, SAMPLE_SETTINGS

SEED = 1234
LATENT = 16
VAE_CONFIG = {"base_dim": 8, "z_dim": LATENT, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
              "temperal_downsample": [False, True, True]}
QWEN_HIDDEN = 48
LATENT_NOISE = 0.1  # std of the noise added to normalised latents while training the VAE decoder
CONTEXT_DIM = 64


def corpus() -> tuple[str, ...]:
    """Tokenizer training text: every caption of every colour, the held-out one included, so ``purple`` is a
    known word to both tokenizers (the base only never sees it in training)."""
    return tuple(spec.caption for spec in shapes.all_specs(shapes.COLOURS))


def configs(qwen_rows: int, t5_rows: int) -> dict[str, dict]:
    return {
        "dit": {"in_channels": LATENT + 1, "out_channels": LATENT, "num_attention_heads": 4,
                "attention_head_dim": 32, "num_layers": 4, "mlp_ratio": 4.0, "text_embed_dim": CONTEXT_DIM,
                "adaln_lora_dim": 32, "patch_size": (1, 2, 2), "rope_scale": (1.0, 4.0, 4.0),
                "extra_pos_embed_type": None, "concat_padding_mask": False},
        "adapter": {"source_dim": QWEN_HIDDEN, "target_dim": CONTEXT_DIM, "model_dim": CONTEXT_DIM, "num_layers": 2,
                    "num_attention_heads": 2, "mlp_ratio": 4.0, "target_vocab_size": t5_rows,
                    "use_self_attention": True},
        "qwen": {"vocab_size": qwen_rows, "hidden_size": QWEN_HIDDEN, "intermediate_size": 3 * QWEN_HIDDEN,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def dataset(n: int, seed: int, colours=shapes.SEEN_COLOURS) -> tuple[torch.Tensor, list[str]]:
    """``n`` images (seen colours by default) as a (n, 3, 64, 64) tensor in [-1, 1] and their captions."""
    import numpy as np

    images, captions = [], []
    for image, caption in shapes.generate(n, seed=seed, colours=colours):
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
        captions.append(caption)
    return torch.stack(images), captions


def to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def score_of_recon(recon: torch.Tensor, captions: list[str]) -> float:
    from anima_core.demo.scoring import score

    return score([to_pil(r) for r in recon], captions).colour


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- VAE ----------------------------------------------------------------------------------------------------
def _decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode`` without its final clamp to [-1, 1] (single frame): the clamp gives out-of-range pixels a zero
    gradient, so a decoder that overshoots on a dark channel could never be pulled back while training."""
    vae.clear_cache()
    hidden = vae.post_quant_conv(z)
    vae._conv_idx = [0]
    out = vae.decoder(hidden, feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


SHAPE_WEIGHT = 20.0  # extra squared-error weight on the saturated (shape) pixels


def train_vae(images: torch.Tensor, steps: int, batch: int, seed: int, crop_share: float = 0.75,
              peak_lr: float = 2e-3):
    """Autoencoder on the normalised latents. The first ``crop_share`` of the steps see random 32 px crops
    (4× cheaper per image, so twice the images at half the cost; the convolutions do not care), the rest the
    full 64 px images.

    The reconstruction loss is a squared error with the shape pixels weighted up (×(1 + SHAPE_WEIGHT)). An L1 term
    on them must not be used: the shapes come in four very different colours, and while the latents do not yet tell
    them apart, L1 drives every shape to the per-channel *median* of the colours, a dark green that is a stable
    plateau (every shape decoded dark green / olive, whatever its colour); the squared error's pull grows with the
    colour error instead and splits the colours within ~100 steps even on a handful of images."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**VAE_CONFIG).train()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    opt = torch.optim.Adam(vae.parameters(), lr=peak_lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, 20)
        if step < crop_share * steps:
            x = images[torch.randint(len(images), (2 * batch,), generator=gen)]
            top, left = (8 * int(v) for v in torch.randint(5, (2,), generator=gen))  # latent-aligned
            x = x[:, :, top:top + 32, left:left + 32].unsqueeze(2)
        else:
            x = images[torch.randint(len(images), (batch,), generator=gen)].unsqueeze(2)
        posterior = vae.encode(x).latent_dist
        # the loader's normalisation, z = (μ − mean) / std. The decoder sees z plus a little fixed noise (robust to
        # the DiT's imperfect latents) instead of a sampled posterior: a KL term pulls the posterior std to 1,
        # i.e. as much noise as signal at unit scale, and the VAE then only learns the blurred average colour.
        mu = (posterior.mean - mean) / std
        z = mu + LATENT_NOISE * torch.randn(mu.shape, generator=gen)
        recon = _decode_unclamped(vae, z * std + mean)
        error = (recon - x).pow(2)
        mse = error.mean()
        # the shapes are a small part of each image: weighting their (saturated) pixels up keeps the VAE from
        # settling on "plain background"
        saturation = x.max(dim=1, keepdim=True).values - x.min(dim=1, keepdim=True).values
        weight = 1.0 + SHAPE_WEIGHT * (saturation > 0.5).float()
        recon_loss = (weight * error).mean()
        # per-channel batch moments of the normalised means: pulls them to mean 0 / std 1 (the DiT's scale)
        ch_mean = mu.mean(dim=(0, 2, 3, 4))
        ch_std = mu.std(dim=(0, 2, 3, 4))
        moments = ch_mean.pow(2).mean() + (ch_std - 1).pow(2).mean()
        loss = recon_loss + 0.05 * moments
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps}: mse {mse.item():.5f} weighted {recon_loss.item():.5f} moments "
                f"{moments.item():.4f} ({time.time() - t0:.0f} s)")
    return vae.eval()


@torch.no_grad()
def colour_check(vae, n: int, seed: int, colours) -> float:
    """Colour accuracy (``anima_core.demo.scoring``) of the VAE's reconstructions of ``n`` fresh images."""
    import numpy as np

    from anima_core.demo.scoring import score
    from anima_core.model.vae import AnimaVAE

    pairs = list(shapes.generate(n, seed=seed, colours=colours))
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
                     for im, _ in pairs])
    wrapped = AnimaVAE(vae)
    recon = wrapped.decode(wrapped.encode(x))
    return score([to_pil(r) for r in recon], [c for _, c in pairs]).colour


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Normalised posterior-mode latents exactly as ``anima_core.model.vae.AnimaVAE.encode`` makes them."""
    from anima_core.model.vae import AnimaVAE

    wrapped = AnimaVAE(vae)
    return torch.cat([wrapped.encode(images[i:i + batch]) for i in range(0, len(images), batch)])


# -- DiT + adapter ------------------------------------------------------------------------------------------
def train_dit(latents: torch.Tensor, captions: list[str], text, cfg: dict, steps: int, batch: int, seed: int,
              peak_lr: float, drop: float = 0.1):
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    from anima_core.builtins.timesteps import LogitNormalOptions, _logit_normal
    from anima_core.model.dit import AnimaDiT

    torch.manual_seed(seed)
    model = AnimaDiT(CosmosTransformer3DModel(**cfg["dit"]), AnimaTextConditioner(**cfg["adapter"])).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    sampler = _logit_normal(LogitNormalOptions(uniform_mix_prob=0.1))  # the trainer's default family
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    t0, running = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, 50)
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        # caption dropout: the empty prompt is CFG's negative at sampling time
        caps = ["" if rng.random() < drop else captions[i] for i in idx.tolist()]
        tokens = text.tokenize(caps)
        qwen_hidden = text.encode_qwen(tokens)
        t = sampler.sample(batch, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1, 1)
        noisy = (1 - tb) * x0 + tb * noise
        ctx = model.condition(qwen_hidden, tokens.qwen_mask, tokens.t5_ids, tokens.t5_mask, tokens.t5_weights)
        loss = (model(noisy, t, ctx) - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"dit step {step + 1}/{steps}: loss {loss.item():.4f} (smoothed {running:.4f}) "
                f"({time.time() - t0:.0f} s)")
    model.load_state_dict(ema)
    return model.eval(), running


@torch.no_grad()
def fixed_loss(model, latents: torch.Tensor, captions: list[str], text) -> float:
    """Velocity MSE of the first 64 latents at t = 0.2 … 0.8 with fixed noise (comparable across runs)."""
    gen = torch.Generator().manual_seed(0)
    x0, caps = latents[:64], captions[:64]
    tokens = text.tokenize(caps)
    ctx = model.condition(text.encode_qwen(tokens), tokens.qwen_mask, tokens.t5_ids, tokens.t5_mask,
                          tokens.t5_weights)
    total = 0.0
    for t in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(x0.shape, generator=gen)
        v = model((1 - t) * x0 + t * noise, torch.full((len(caps),), t), ctx)
        total += float((v - (noise - x0)).pow(2).mean())
    return total / 4


def write_made(out: Path, record: dict) -> Path:
    """``MADE.md`` beside the files: how they were made and what they scored."""
    seen = record["base_scores_seen"]
    text = f"""# The demo base model set

Made by `scripts/make_demo_base.py` (repository root) with:

    {record["command"]}

on the CPU ({record["threads"]} torch thread(s), torch {record["torch"]}), seed {record["seed"]}, in
{record["minutes"]} min on a shared 2-core machine. Files: the DiT + LLM adapter in one file with the `net.` prefix
(bf16), Qwen3 with `model.*` keys and no config (bf16, random and frozen: never trained), the VAE in the Wan2.1 layout
(fp32), and the Qwen / T5 tokenizer folders built in-process from every demo caption (so `{shapes.HELD_OUT}` is a
known word). {record["package_bytes"] / 1e6:.2f} MB in all.

Pretraining data: {record["images"]} procedural 64 px images (`anima_core.demo.shapes`) of the colours
{", ".join(shapes.SEEN_COLOURS)}; **`{shapes.HELD_OUT}` is held out** (never in pretraining), the concept the demo
LoRA teaches.

| figure | value |
|---|---|
| VAE steps / reconstruction MSE (images in [-1, 1]) | {record["vae_steps"]} / {record["vae_recon_mse"]} |
| normalised latents: max per-channel mean, std range | {record["latent_abs_mean_max"]}, {record["latent_std_range"]} |
| DiT steps × batch / final smoothed loss / fixed-noise eval loss | {record["dit_steps"]} × {record["batch"]} / {record["dit_final_loss"]} / {record["dit_eval_loss"]} |
| base samples of seen concepts (n = {seen["n"]}): colour / shape / position / size | {seen["colour"]} / {seen["shape"]} / {seen["position"]} / {seen["size"]} |
| base samples of `{shapes.HELD_OUT}` prompts that come out {shapes.HELD_OUT} | {record["base_held_out_rate"]} |

Samples: {json.dumps(record["sample_settings"])}, prompt i with seed i, scored by `anima_core.demo.scoring`.
"""
    path = Path(out) / "MADE.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BASE_DIR, help="Folder for the model files (default: the "
                                                                   "packaged anima_core/demo/base).")
    parser.add_argument("--work", type=Path, default=Path("demo-base-work"), help="Folder for grids and figures.")
    parser.add_argument("--quick", action="store_true", help="Low budget: checks the pipeline in ~3 minutes.")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--vae-steps", type=int, default=1300)
    parser.add_argument("--dit-steps", type=int, default=2500)
    parser.add_argument("--vae-colours", choices=("all", "seen"), default="all",
                        help="Colours of the VAE's training images (all: the held-out one too; the DiT never sees it).")
    parser.add_argument("--dit-lr", type=float, default=1e-3, help="Peak learning rate of the DiT + adapter.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared and "
                                                                  "oversubscribed OpenMP threads run slower)")
    parser.add_argument("--reuse-vae", type=Path, help="Load the VAE from WORK/vae.pt of an earlier run with the "
                                                        "same options instead of training it again.")
    parser.add_argument("--made-from", type=Path, help="Only rewrite OUT/MADE.md from a figures.json of a run.")
    args = parser.parse_args(argv)
    if args.made_from:
        write_made(args.out, json.loads(args.made_from.read_text()))
        return 0
    if args.quick:
        args.images, args.vae_steps, args.dit_steps = 400, 80, 100
        if args.out == BASE_DIR:
            args.out = args.work / "quick-base"
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats are very slow on x86 CPUs
    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)

    log(f"dataset: {args.images} images of seen colours {', '.join(shapes.SEEN_COLOURS)} (held out: "
        f"{shapes.HELD_OUT})")
    images, captions = dataset(args.images, args.seed)

    # the VAE is a generic image codec (as Anima's is): it must also reconstruct the held-out colour that the demo
    # LoRA later trains on, and a VAE fitted to four colours maps purple onto them. So it trains on all colours;
    # only the DiT (the concept learner) never sees purple.
    vae_images = images if args.vae_colours == "seen" else dataset(args.images, args.seed + 5, shapes.COLOURS)[0]
    if args.reuse_vae:  # a VAE this script trained before (same seeds and steps): skips ~10 min
        from diffusers import AutoencoderKLQwenImage

        vae = AutoencoderKLQwenImage(**VAE_CONFIG)
        vae.load_state_dict(torch.load(args.reuse_vae, weights_only=True))
        vae.eval()
    else:
        vae = train_vae(vae_images, args.vae_steps, 8, args.seed + 1)
        torch.save(vae.state_dict(), args.work / "vae.pt")
    latents = encode_all(vae, images)
    from anima_core.model.vae import AnimaVAE

    with torch.no_grad():
        recon = torch.cat([AnimaVAE(vae).decode(latents[i:i + 64]) for i in range(0, 256, 64)])
    recon_mse = float((recon - images[:256]).pow(2).mean())
    from anima_core.demo.evaluate import write_grid

    write_grid([("images", [to_pil(x) for x in images[:8]]), ("VAE", [to_pil(x) for x in recon[:8]])],
               args.work / "vae_reconstructions.png")
    lat_mean, lat_std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
    log(f"vae: reconstruction MSE {recon_mse:.5f} (PSNR {10 * math.log10(4 / recon_mse):.1f} dB); normalised "
        f"latents per channel: |mean| ≤ {lat_mean.abs().max():.3f}, std {lat_std.min():.3f}…{lat_std.max():.3f}")
    with torch.no_grad():
        held_in = score_of_recon(recon, captions[:256])
    vae_purple = colour_check(vae, 64, args.seed + 10, (shapes.HELD_OUT,))
    log(f"vae: colour accuracy of reconstructions: {held_in:.3f} (256 training images), {vae_purple:.3f} "
        f"({shapes.HELD_OUT}, 64 fresh images)")

    from transformers import Qwen3Config, Qwen3Model

    from anima_core.model.text_encoder import TextEncoder
    from anima_core.testing.tiny import QWEN3_FIXED, _randomise, _round_up
    from anima_core.testing.tokenizers import build_qwen_tokenizer, build_t5_tokenizer

    qwen_tok, t5_tok = build_qwen_tokenizer(corpus()), build_t5_tokenizer(corpus())
    cfg = configs(_round_up(len(qwen_tok)), _round_up(len(t5_tok)))
    with torch.random.fork_rng(devices=[]):
        qwen = Qwen3Model(Qwen3Config(**cfg["qwen"], **QWEN3_FIXED))
    _randomise(qwen, args.seed + 2)  # frozen and random: the base learns to read it, as Anima reads Qwen3
    qwen.float().eval().requires_grad_(False)
    text = TextEncoder(qwen, qwen_tok, t5_tok)

    model, final_loss = train_dit(latents, captions, text, cfg, args.dit_steps, args.batch, args.seed + 3,
                                  args.dit_lr)
    eval_loss = fixed_loss(model, latents, captions, text)
    log(f"dit: final smoothed training loss {final_loss:.4f}; fixed-noise eval loss {eval_loss:.4f}")

    from anima_core.testing.tiny import write_model_files

    paths = write_model_files(args.out, model.transformer, model.text_conditioner, qwen, vae, names=FILE_NAMES,
                              dtype=torch.bfloat16, corpus=corpus())
    size = sum(p.stat().st_size for path in paths.values() for p in ([path] if path.is_file() else path.rglob("*")))
    log(f"wrote {args.out} ({size / 1e6:.2f} MB)")

    from anima_core.demo.evaluate import evaluate_base

    figures = evaluate_base(paths, args.work / "base_samples.png")
    elapsed = (time.time() - started) / 60
    log(f"base samples through the real loaders: seen concepts {json.dumps(figures['seen'])}; held-out "
        f"'{shapes.HELD_OUT}' rate {figures['held_out_rate']:.2f}; grid {args.work / 'base_samples.png'}")
    log(f"total {elapsed:.1f} min")
    record = {"command": "python scripts/make_demo_base.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "seed": args.seed, "images": args.images, "vae_steps": args.vae_steps, "dit_steps": args.dit_steps,
              "dit_lr": args.dit_lr,
              "batch": args.batch, "threads": args.threads, "vae_recon_mse": round(recon_mse, 6),
              "vae_colour_held_in": held_in, "vae_colour_held_out": vae_purple,
              "latent_abs_mean_max": round(float(lat_mean.abs().max()), 4),
              "latent_std_range": [round(float(lat_std.min()), 4), round(float(lat_std.max()), 4)],
              "dit_final_loss": round(final_loss, 5), "dit_eval_loss": round(eval_loss, 5),
              "base_scores_seen": figures["seen"], "base_held_out_rate": figures["held_out_rate"],
              "sample_settings": SAMPLE_SETTINGS, "package_bytes": size, "minutes": round(elapsed, 1),
              "torch": torch.__version__}
    (args.work / "figures.json").write_text(json.dumps(record, indent=2) + "\n")
    write_made(args.out, record)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
