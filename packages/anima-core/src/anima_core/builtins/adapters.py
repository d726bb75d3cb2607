"""Core adapter variant ``lora``."""

from __future__ import annotations

from typing import Literal, Optional

from anima_core.options import AdapterOptions, field
from anima_core.specs import VariantSpec

# Attention q/k/v/o (self and cross) and the MLP of every DiT block, in diffusers module names
# (transformer_blocks.N.attn1.to_q ...): the 280 Linears sd-scripts targets on the 28-block model.
ANIMA_DEFAULT_TARGETS = [
    r"(.*\.)?transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    r"(.*\.)?transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
]
# Opt-in: the per-block AdaLN modulation Linears (adaln_modulation_* in the original names) ...
ADALN_TARGETS = [r"(.*\.)?transformer_blocks\.\d+\.norm[123]\.linear_[12]"]
# ... and the LLM adapter's attention and MLP Linears (llm_adapter.blocks.N.*; 60 on the real adapter).
LLM_ADAPTER_TARGETS = [
    r"(.*\.)?text_conditioner\.blocks\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)",
    r"(.*\.)?text_conditioner\.blocks\.\d+\.mlp\.(0|2)",
]


class LoRAOptions(AdapterOptions):
    type: Literal["lora"] = "lora"
    rank: int = field(16, "LoRA rank (dim).", ge=1)
    alpha: Optional[float] = field(8.0, "LoRA alpha; the update is scaled by alpha / rank (None = rank).", gt=0)
    rs_lora: bool = field(False, "Rank-stabilised scaling alpha / sqrt(rank).", advanced=True)
    dropout: float = field(0.0, "Dropout on the LoRA input.", ge=0, lt=1, advanced=True)
    rank_by_regex: dict[str, int] = field({}, "Per-module rank: {regex over the module path: rank}; first match "
                                              "wins.", advanced=True)
    targets: list[str] = field(ANIMA_DEFAULT_TARGETS, "Regexes (full match) of the Linear modules to adapt.",
                               advanced=True, min_length=1)
    exclude: list[str] = field([], "Regexes of modules never adapted.", advanced=True)
    train_adaln: bool = field(False, "Also adapt the AdaLN modulation Linears of every block.", advanced=True)
    train_llm_adapter: bool = field(False, "Also adapt the LLM adapter (much of Anima's style and character "
                                           "knowledge lives there; sd-scripts suggests a lower lr).", advanced=True)

    def target_patterns(self) -> list[str]:
        return [*self.targets, *(ADALN_TARGETS if self.train_adaln else []),
                *(LLM_ADAPTER_TARGETS if self.train_llm_adapter else [])]


def _build(options: LoRAOptions):
    from anima_core.lora import LoRAAdapter

    return LoRAAdapter(options)


def _validate(options: LoRAOptions, config):
    import re

    from anima_core.specs import error

    for i, pattern in enumerate([*options.targets, *options.exclude, *options.rank_by_regex]):
        try:
            re.compile(pattern)
        except re.error as exc:
            yield error("adapter", f"invalid regex {pattern!r}: {exc}")
    for pattern, rank in options.rank_by_regex.items():
        if rank < 1:
            yield error(f"adapter.rank_by_regex.{pattern}", f"rank must be >= 1 (found {rank})")


LORA = VariantSpec(name="lora", options=LoRAOptions, build=_build, validate=_validate,
                   description="Plain LoRA on nn.Linear modules (kohya/ComfyUI key format).")
