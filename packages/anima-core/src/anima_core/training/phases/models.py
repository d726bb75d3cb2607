"""models: load the frozen model set (built on the meta device, read straight into its dtype or fp8), inject the
adapter, then place everything on this process's device — all of it, or all but the swapped DiT blocks."""

from __future__ import annotations

import sys

from anima_core.errors import UserError
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
    qwen = load_qwen3(m.text_encoder, dtype=dtype, precision=m.text_encoder_precision).to(device)
    text = TextEncoder(qwen, load_tokenizer(m.qwen_tokenizer, "qwen_tokenizer"),
                       load_tokenizer(m.t5_tokenizer, "t5_tokenizer"))
    vae = load_vae(m.vae, dtype=resolve_dtype(m.vae_dtype)).to(device)
    dit = load_transformer(m.transformer, dtype=dtype, base_precision=m.base_precision)
    blocks = len(dit.transformer.transformer_blocks)
    if m.blocks_to_swap > blocks:
        raise UserError(f"model.blocks_to_swap: {m.blocks_to_swap} is more than the {blocks} blocks of "
                        f"{m.transformer}")
    dit.set_attention_backend(m.attention)
    dit.set_gradient_checkpointing(m.gradient_checkpointing)
    adapter = ctx.registry.spec("adapter", cfg.adapter.type).build(cfg.adapter)
    # The same seed on every process: all ranks must start from identical adapter weights. The adapter is
    # created on the CPU, before placement, so its initial weights are the same on any device.
    seed_everything(derived_seed(cfg.train.seed, 0x5EED))
    adapter.inject(dit)
    train_module = TrainModule(dit, adapter)
    swap = None
    if m.blocks_to_swap:
        from anima_core.model.block_swap import attach_block_swap

        swap = attach_block_swap(dit, m.blocks_to_swap, device)
        train_module.adapter_modules.to(device)
    else:
        train_module.to(device)
    if cfg.train.compile:
        from anima_core.model.compile import compile_blocks

        compile_blocks(dit)
    train_module.train()
    ctx.models = Models(dit=dit, text=text, vae=vae, adapter=adapter, dtype=dtype, train_module=train_module,
                        block_swap=swap)
