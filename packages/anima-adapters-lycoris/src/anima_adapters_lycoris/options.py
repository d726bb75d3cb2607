"""Options of ``lokr``, ``loha`` and ``locon``, and their validation. Import-cheap: pydantic and core only.

The options extend core's ``lora`` options, so rank/alpha/rs-scaling, per-module rank by regex and the target set
(``targets``/``exclude`` plus the ``train_adaln``/``train_llm_adapter`` opt-ins, ``target_patterns()``) are core's
own fields and logic, not a copy.
"""

from __future__ import annotations

from typing import Literal

from anima_core.builtins.adapters import LORA, LoRAOptions
from anima_core.options import field
from anima_core.specs import error, warning


class LycorisOptions(LoRAOptions):
    """What the three lycoris algorithms share (not a variant of its own)."""

    dropout: float = field(0.0, "Dropout on the adapter's output; lycoris applies it in bypass mode only.", ge=0,
                           lt=1, advanced=True)
    rank_dropout: float = field(0.0, "Drop this fraction of ΔW rows (LoCon: of rank channels) per step.", ge=0,
                                lt=1, advanced=True)
    module_dropout: float = field(0.0, "Skip a whole module's update with this probability per step.", ge=0, lt=1,
                                  advanced=True)
    dora: bool = field(False, "DoRA: also learn a per-input-column magnitude (weight decomposition). Rebuilds the "
                              "weight every forward, so no bypass mode.", advanced=True)
    bypass_mode: bool | None = field(None, "Compute W·x + ΔW·x without building ΔW (faster on large layers). None "
                                           "= on for LoCon, and for LoKr without rank_dropout, unless DoRA is on.",
                                     advanced=True)
    llm_adapter_lr: float | None = field(None, "Learning rate of the LLM-adapter targets (train_llm_adapter); "
                                                  "None = the optimizer's lr.", gt=0, advanced=True)

    def effective_bypass(self) -> bool:
        if self.bypass_mode is not None:
            return self.bypass_mode
        if self.dora:
            return False
        # Measured (bench/bypass_vs_rebuild.py): LoCon and LoKr gain 2-3x on a 2048 Linear, LoHa nothing; LoKr's
        # bypass ignores rank_dropout, so that setting keeps the rebuild.
        return self.type == "locon" or (self.type == "lokr" and self.rank_dropout == 0)


class LoKrOptions(LycorisOptions):
    type: Literal["lokr"] = "lokr"
    factor: int = field(8, "Kronecker factor: each dim splits into (≤factor, rest); -1 = balanced (√dim).", ge=-1)
    full_matrix: bool = field(False, "Keep lokr_w2 a full matrix (no rank; the update scale is 1 whatever alpha, "
                                     "as ComfyUI applies it). Also chosen per layer when rank ≥ max(w2 dims)/2.",
                              advanced=True)
    decompose_both: bool = field(False, "Also factor the small lokr_w1 into lokr_w1_a·lokr_w1_b when rank allows.",
                                 advanced=True)


class LoHaOptions(LycorisOptions):
    type: Literal["loha"] = "loha"


class LoConOptions(LycorisOptions):
    type: Literal["locon"] = "locon"


def validate(options: LycorisOptions, config):
    yield from LORA.validate(options, config)
    if options.dora and options.bypass_mode:
        yield error("adapter.bypass_mode", "DoRA rebuilds the weight every forward; bypass_mode must be off with "
                                           "dora (lycoris would silently drop the magnitude in bypass mode)")
    bypass = options.effective_bypass()
    if getattr(getattr(config, "model", None), "base_precision", "dtype") == "fp8":
        if options.dora:
            yield error("adapter.dora", "DoRA rebuilds the full weight every forward, which an fp8 base "
                                        "(model.base_precision: fp8) does not hold: turn one of them off")
        elif options.bypass_mode is False:
            yield warning("adapter.bypass_mode", "false is overridden on an fp8 base (model.base_precision: fp8): "
                                                 "the weight cannot be rebuilt in fp8, so bypass mode is used")
        bypass = True
    if options.dropout > 0 and not bypass:
        yield warning("adapter.dropout", f"{options.dropout} has no effect: lycoris applies dropout in bypass mode "
                                         f"only (set bypass_mode: true, or use rank_dropout/module_dropout)")
    if isinstance(options, LoKrOptions):
        if options.factor == 0:
            yield error("adapter.factor", "must be -1 (balanced) or a positive integer (found 0)")
        if bypass and options.rank_dropout > 0:
            yield warning("adapter.rank_dropout", "LoKr in bypass mode ignores rank_dropout (lycoris applies it to "
                                                  "the rebuilt ΔW only)")
    if options.llm_adapter_lr is not None and not options.train_llm_adapter:
        yield warning("adapter.llm_adapter_lr", "has no effect without train_llm_adapter: true")
