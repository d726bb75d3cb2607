"""The public model-stack API: load the model set from the paths a config takes, then encode prompts, predict
velocities, encode/decode images, apply LoRA files and generate. The CLI is built on this."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from anima_core.model.dit import AnimaDiT, load_transformer
from anima_core.model.lora_files import AppliedLoRA, apply_lora_file
from anima_core.model.text_encoder import TextEncoder, load_qwen3, load_tokenizer
from anima_core.model.vae import AnimaVAE, load_vae

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        from anima_core.errors import UserError

        raise UserError(f"unknown dtype {value!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[value]


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 30
    cfg: float = 4.0
    shift: float = 3.0
    seed: int = 0
    sampler: str = "er_sde"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    loras: list[tuple[str, float]] = field(default_factory=list)

    def as_metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class AnimaModels:
    """DiT + LLM adapter, text encoder (Qwen3 + tokenizers) and VAE, on one device."""

    dit: AnimaDiT
    text: TextEncoder
    vae: AnimaVAE
    device: torch.device
    dtype: torch.dtype
    loras: list[AppliedLoRA] = field(default_factory=list)

    @classmethod
    def load(cls, transformer: Path | str, text_encoder: Path | str, vae: Path | str,
             qwen_tokenizer: Path | str | None, t5_tokenizer: Path | str | None, *, device: str = "cpu",
             dtype: str | torch.dtype = "fp32", vae_dtype: str | torch.dtype = "fp32",
             attention: str = "sdpa", base_precision: str = "dtype",
             text_encoder_precision: str = "dtype") -> AnimaModels:
        """Load every component (single files or diffusers/HF folders; built on the meta device and read straight
        into ``dtype``, or fp8 for ``*_precision="fp8"``) and place them on ``device``."""
        dev = torch.device(device)
        dt = resolve_dtype(dtype)
        qwen_tok = load_tokenizer(qwen_tokenizer, "qwen_tokenizer")
        t5_tok = load_tokenizer(t5_tokenizer, "t5_tokenizer")
        dit = load_transformer(transformer, dtype=dt, base_precision=base_precision).to(dev)
        dit.set_attention_backend(attention)
        qwen = load_qwen3(text_encoder, dtype=dt, precision=text_encoder_precision).to(dev)
        autoencoder = load_vae(vae, dtype=resolve_dtype(vae_dtype)).to(dev)
        return cls(dit, TextEncoder(qwen, qwen_tok, t5_tok), autoencoder, dev, dt)

    @classmethod
    def from_config(cls, config, *, device: str = "cpu") -> AnimaModels:
        """From a validated config's ``model`` section."""
        m = config.model
        return cls.load(m.transformer, m.text_encoder, m.vae, m.qwen_tokenizer, m.t5_tokenizer, device=device,
                        dtype=m.dtype, vae_dtype=m.vae_dtype, attention=m.attention,
                        base_precision=m.base_precision, text_encoder_precision=m.text_encoder_precision)

    # -- conditioning and prediction -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Cross-attention context (B, ≥512, D) for the prompts."""
        batch = self.text.tokenize(prompts).to(self.device)
        hidden = self.text.encode_qwen(batch).to(self.dtype)
        return self.dit.condition(hidden, batch.qwen_mask, batch.t5_ids, batch.t5_mask, batch.t5_weights)

    def predict_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """v = ε − x0 predicted for normalised latents at σ (shape [B]); fp32 out."""
        out = self.dit(latents.to(self.device, self.dtype), sigma.to(self.device), context.to(self.dtype))
        return out.float()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → normalised latents (B, 16, 1, H/8, W/8)."""
        return self.vae.encode(images.to(self.device))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → images (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode(latents.to(self.device))

    # -- LoRA -------------------------------------------------------------------------------------------
    def apply_lora(self, path: Path | str, strength: float = 1.0) -> AppliedLoRA:
        """Merge a LoRA file (ours, kohya/ComfyUI ``lora_unet_*`` or ``diffusion_model.*``, or any format an installed
        adapter reads through its spec's ``file_deltas``, e.g. LoKr/LoHa) at ``strength``."""
        applied = apply_lora_file(self.dit, path, strength)
        self.loras.append(applied)
        return applied

    # -- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_latents(self, params: GenerationParams, *, sampler=None,
                         progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        from anima_core.samplers import simple_sigmas

        if params.width % 16 or params.height % 16:
            raise ValueError(f"width and height must be multiples of 16, found {params.width}×{params.height}")
        if sampler is None:
            sampler = _build_sampler(params.sampler, params.sampler_options)
        sigmas = simple_sigmas(params.steps, params.shift)
        generator = torch.Generator().manual_seed(params.seed)  # CPU noise: the same image on any device
        shape = (1, 16, 1, params.height // 8, params.width // 8)
        x = (torch.randn(shape, generator=generator) * sigmas[0]).to(self.device)
        use_cfg = params.cfg != 1.0
        prompts = [params.negative_prompt, params.prompt] if use_cfg else [params.prompt]
        context = self.encode_prompts(prompts)

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if use_cfg:
                v_u, v_c = self.predict_velocity(torch.cat([x_t, x_t]), sigma.repeat(2), context).chunk(2)
                v = v_u + params.cfg * (v_c - v_u)
            else:
                v = self.predict_velocity(x_t, sigma, context)
            return x_t - sigma.to(x_t.device).view(-1, 1, 1, 1, 1) * v

        def callback(i: int, total: int, _x0: torch.Tensor) -> None:
            if progress is not None:
                progress(i + 1, total)

        return sampler.sample(denoise, x, sigmas, generator=generator, callback=callback, shift=params.shift)

    def generate(self, params: GenerationParams, **kwargs: Any):
        """One PIL image for the parameters (same seed ⇒ same image)."""
        from PIL import Image

        images = self.decode(self.generate_latents(params, **kwargs))
        array = ((images[0].permute(1, 2, 0).cpu().float() + 1.0) * 127.5).round().clamp(0, 255).byte().numpy()
        return Image.fromarray(array)


def _build_sampler(name: str, options: dict[str, Any]):
    from anima_core.plugin_host import get_host

    spec = get_host().registry.spec("inference_sampler", name)
    return spec.build(spec.options.model_validate({"type": name, **options}))
