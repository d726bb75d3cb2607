"""The three variant specs. Import-cheap: torch and lycoris load inside ``build`` / ``file_deltas``."""

from __future__ import annotations

from anima_adapters_lycoris.options import LoConOptions, LoHaOptions, LoKrOptions, validate
from anima_core.specs import VariantSpec


def build(options):
    from anima_adapters_lycoris.adapter import LycorisAdapter

    return LycorisAdapter(options)


def file_deltas(tensors, metadata, weights):
    from anima_adapters_lycoris.file_format import file_deltas as deltas

    return deltas(tensors, metadata, weights)


LOKR = VariantSpec(name="lokr", options=LoKrOptions, build=build, validate=validate, file_deltas=file_deltas,
                   description="LoKr (lycoris-lora): ΔW = kron(w1, w2), ComfyUI-loadable lora_unet_* keys.")
LOHA = VariantSpec(name="loha", options=LoHaOptions, build=build, validate=validate, file_deltas=file_deltas,
                   description="LoHa (lycoris-lora): ΔW = (w1a·w1b) ⊙ (w2a·w2b), ComfyUI-loadable lora_unet_* keys.")
LOCON = VariantSpec(name="locon", options=LoConOptions, build=build, validate=validate, file_deltas=file_deltas,
                    description="LoCon (lycoris-lora's LoRA, with DoRA/bypass/rank dropout), lora_unet_* keys.")
