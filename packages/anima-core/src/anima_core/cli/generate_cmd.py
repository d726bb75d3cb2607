"""``anima generate``: one image from the model set, with optional LoRA files."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

LORA_HELP = "LoRA file, optionally with a strength: FILE[:STRENGTH] (repeatable)."


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt (ComfyUI weight syntax: (tag:1.2), \\( )."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n", help="Negative prompt for CFG."),
    output: Path = typer.Option(Path("anima.png"), "-o", "--output", help="PNG file to write."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Take model paths (and sample defaults) "
                                                                       "from this training config."),
    transformer: Optional[Path] = typer.Option(None, help="DiT + llm_adapter single file or diffusers folder."),
    text_encoder: Optional[Path] = typer.Option(None, help="Qwen3-0.6B safetensors file or HF folder."),
    vae: Optional[Path] = typer.Option(None, help="Qwen-Image VAE file or diffusers folder."),
    qwen_tokenizer: Optional[Path] = typer.Option(None, help="Qwen tokenizer folder."),
    t5_tokenizer: Optional[Path] = typer.Option(None, help="T5 tokenizer folder."),
    lora: List[str] = typer.Option([], "--lora", help=LORA_HELP),
    demo: bool = typer.Option(False, "--demo", help="Use the packaged tiny pretrained demo base (64 px shapes; "
                                                    "sizes and sampling default to the demo's)."),
    sampler: str = typer.Option("er_sde", help="Inference sampler (see `anima plugins list`)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Sampling steps (default 30; 20 with --demo)."),
    cfg: float = typer.Option(4.0, min=0.0, help="CFG scale (1 disables the negative pass)."),
    shift: float = typer.Option(3.0, min=0.01, help="Flow sigma shift (ComfyUI's Anima default 3)."),
    seed: int = typer.Option(0, help="Seed of the initial noise."),
    width: Optional[int] = typer.Option(None, min=16, help="Width in pixels, multiple of 16 (default 1024; 64 with "
                                                           "--demo)."),
    height: Optional[int] = typer.Option(None, min=16, help="Height in pixels, multiple of 16 (default 1024; 64 "
                                                            "with --demo)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto picks CUDA if "
                                                                  "available)."),
    dtype: Optional[str] = typer.Option(None, help="fp32, bf16 or fp16 (default: the config's, else bf16 on "
                                                   "GPU / fp32 on CPU)."),
) -> None:
    """Generate one image with the Anima model set (and LoRA files)."""
    from anima_core.errors import UserError

    if demo and config is not None:
        raise UserError("--demo and --config both name a model set; give one of them")
    defaults = {"steps": 30, "width": 1024, "height": 1024}
    if demo:
        from anima_core.demo.base import SAMPLE_SETTINGS

        defaults = {key: SAMPLE_SETTINGS[key] for key in defaults}
    steps = defaults["steps"] if steps is None else steps
    width = defaults["width"] if width is None else width
    height = defaults["height"] if height is None else height
    if width % 16 or height % 16:
        raise UserError(f"--width/--height must be multiples of 16, found {width}×{height}")
    paths = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae,
             "qwen_tokenizer": qwen_tokenizer, "t5_tokenizer": t5_tokenizer}
    model_dtype = dtype
    if demo:
        from anima_core.demo import base_model_paths

        base = base_model_paths()
        for key in paths:
            paths[key] = paths[key] or getattr(base, key)
    if config is not None:
        from anima_core.config.loading import load_config
        from anima_core.plugin_host import get_host

        section = load_config(config, [], get_host().registry).config.model
        for key in paths:
            paths[key] = paths[key] or getattr(section, key)
        model_dtype = model_dtype or section.dtype
    missing = [f"--{k.replace('_', '-')}" for k in ("transformer", "text_encoder", "vae") if paths[k] is None]
    if missing:
        raise UserError(f"missing model paths: {', '.join(missing)} (or give --config with a model section, or "
                        f"--demo)")
    from anima_core.progress import progress_bar
    from anima_core.model.lora_files import parse_lora_arg
    from anima_core.model.models import AnimaModels, GenerationParams

    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model_dtype = model_dtype or ("bf16" if dev.startswith("cuda") else "fp32")
    models = AnimaModels.load(**paths, device=dev, dtype=model_dtype)
    loras = [parse_lora_arg(item) for item in lora]
    for path, strength in loras:
        models.apply_lora(path, strength)
    params = GenerationParams(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                              steps=steps, cfg=cfg, shift=shift, seed=seed, sampler=sampler,
                              loras=[(str(p), s) for p, s in loras])
    with progress_bar("sampling", steps) as advance:
        image = models.generate(params, progress=lambda i, n: advance())
    from anima_core.model.png import save_png

    save_png(image, output, params.as_metadata())
    typer.echo(f"wrote {output}")
