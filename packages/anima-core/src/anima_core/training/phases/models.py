"""models: load the frozen model set on this process's device and inject the adapter into the DiT."""

from __future__ import annotations

import sys

from anima_core.model.dit import load_transformer
from anima_core.model.models import resolve_dtype
from anima_core.model.text_encoder import TextEncoder, load_qwen3, load_tokenizer
from anima_core.model.vae import load_vae
from anima_core.training.context import Models, TrainingContext
from anima_core.training.phases.bootstrap import derived_seed, seed_everything
from anima_core.training.train_module import TrainModule


def run(ctx: TrainingContext) -> None:
    cfg, boot = ctx.config, ctx.bootstrap
    m = cfg.model
    device = boot.device
    dtype = resolve_dtype(m.dtype)
    if device.type == "cpu" and m.dtype != "fp32" and boot.is_main:
        print(f"warning: model.dtype={m.dtype} on the CPU is very slow without bf16 hardware; fp32 is faster here",
              file=sys.stderr)
    text = TextEncoder(load_qwen3(m.text_encoder).to(device, dtype), load_tokenizer(m.qwen_tokenizer, "qwen_tokenizer"),
                       load_tokenizer(m.t5_tokenizer, "t5_tokenizer"))
    vae = load_vae(m.vae).to(device, resolve_dtype(m.vae_dtype))
    dit = load_transformer(m.transformer).to(device, dtype)
    dit.set_attention_backend(m.attention)
    dit.set_gradient_checkpointing(m.gradient_checkpointing)
    adapter = ctx.registry.spec("adapter", cfg.adapter.type).build(cfg.adapter)
    # The same seed on every process: all ranks must start from identical adapter weights.
    seed_everything(derived_seed(cfg.train.seed, 0x5EED))
    adapter.inject(dit)
    train_module = TrainModule(dit, adapter).to(device)
    train_module.train()
    ctx.models = Models(dit=dit, text=text, vae=vae, adapter=adapter, dtype=dtype, train_module=train_module)
