"""Plain LoRA on ``nn.Linear`` modules, kohya-style: the original modules keep their weights and state-dict keys;
their ``forward`` is routed through a LoRA module held by a separate network (so saving and loading the base model
is unaffected, and the network's keys are exactly what goes into the file).

Keys are ``<prefix><module path with . → _>.{lora_down.weight, lora_up.weight, alpha}``, the form ComfyUI,
sd-scripts and AnimaLoraStudio read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from anima_core import atomic


class LoRAModule(nn.Module):
    """ΔW = up · down · scale, applied as ``W x + up(down(dropout(x))) · scale · multiplier``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rs: bool = False) -> None:
        super().__init__()
        self.rank = rank
        # fp32 whatever the base dtype: bf16 LoRA weights lose small AdamW updates (autocast still runs the
        # matmuls in the compute dtype).
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        # ComfyUI applies alpha / rank; with rs-scaling we store the alpha that gives alpha_user / sqrt(rank).
        stored_alpha = alpha * math.sqrt(rank) if rs else alpha
        self.register_buffer("alpha", torch.tensor(float(stored_alpha)))
        # A python float, so the forward never reads the buffer (a device sync per call on GPU).
        self.scale = float(stored_alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.multiplier = 1.0
        self.merged = False
        self._base = [base]  # a list keeps the base out of this module's parameters and state dict
        self._base_forward: Callable | None = None

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha) / self.rank

    def attach(self) -> None:
        base = self._base[0]
        self._base_forward = base.forward
        base.forward = self.forward

    def detach(self) -> None:
        if self._base_forward is not None:
            self._base[0].forward = self._base_forward
            self._base_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self._base_forward is not None, "LoRA module is not attached"
        out = self._base_forward(x)
        if self.merged or self.multiplier == 0:
            return out
        lx = self.lora_down(self.dropout(x.to(self.lora_down.weight.dtype)))
        return out + (self.lora_up(lx) * (self.scale * self.multiplier)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_up.weight @ self.lora_down.weight) * (self.scale * self.multiplier)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            _add_to_weight(self._base[0], self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            _add_to_weight(self._base[0], -self.delta_weight())
            self.merged = False


def _add_to_weight(base: nn.Module, delta: torch.Tensor) -> None:
    from anima_core.model.lora_files import add_to_weight

    add_to_weight(base, delta)


def lora_key(module_path: str, prefix: str) -> str:
    return prefix + module_path.replace(".", "_")


def select_linears(model: nn.Module, targets: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """Linear modules whose full dotted path matches a target regex and no exclude regex."""
    want = [re.compile(p) for p in targets]
    skip = [re.compile(p) for p in exclude]
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and any(p.fullmatch(name) for p in want)
            and not any(p.fullmatch(name) for p in skip)}


def rank_for(name: str, default: int, rank_by_regex: Mapping[str, int]) -> int:
    for pattern, rank in rank_by_regex.items():
        if re.fullmatch(pattern, name):
            return rank
    return default


class LoRANetwork(nn.Module):
    """The LoRA modules of one model, keyed by their file names."""

    def __init__(self) -> None:
        super().__init__()
        self.loras = nn.ModuleDict()

    def add(self, key: str, module: LoRAModule) -> None:
        self.loras[key] = module
        module.attach()

    def state_dict_for_file(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, mod in self.loras.items():
            out[f"{key}.lora_down.weight"] = mod.lora_down.weight.detach()
            out[f"{key}.lora_up.weight"] = mod.lora_up.weight.detach()
            out[f"{key}.alpha"] = mod.alpha.detach()
        if dtype is not None:
            # alpha stays fp32 (as lycoris stores it): ComfyUI computes the scale from alpha.item(), and a bf16
            # alpha shifts it (rs-LoRA rank 8: 11.3137 would be stored as 11.3125)
            out = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v
                   for k, v in out.items()}
        return {k: v.contiguous().cpu() for k, v in out.items()}

    def load_file_state(self, tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Copy tensors in; returns (missing, unexpected) keys. Shapes must match."""
        own = self.state_dict_for_file()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        with torch.no_grad():
            for key, mod in self.loras.items():
                for suffix, target in (("lora_down.weight", mod.lora_down.weight),
                                       ("lora_up.weight", mod.lora_up.weight), ("alpha", mod.alpha)):
                    src = tensors.get(f"{key}.{suffix}")
                    if src is None:
                        continue
                    if tuple(src.shape) != tuple(target.shape):
                        raise ValueError(f"{key}.{suffix}: expected shape {tuple(target.shape)}, found "
                                         f"{tuple(src.shape)}")
                    target.copy_(src.to(target.dtype))
                mod.refresh_scale()
        return missing, unexpected

    def detach_all(self) -> None:
        for mod in self.loras.values():
            mod.detach()


def save_file(tensors: dict[str, torch.Tensor], path: Path | str, metadata: Mapping[str, str] | None) -> None:
    from safetensors.torch import save_file as st_save

    atomic.write_with(path, lambda tmp: st_save(tensors, str(tmp), metadata=dict(metadata or {})))


class LoRAAdapter:
    """Core's ``lora`` adapter (satisfies :class:`anima_core.protocols.AdapterProtocol`)."""

    def __init__(self, options) -> None:  # options: anima_core.builtins.adapters.LoRAOptions
        self.options = options
        self.network = LoRANetwork()
        self.prefix = "lora_unet_"

    def inject(self, model: nn.Module) -> None:
        o = self.options
        patterns = o.target_patterns() if hasattr(o, "target_patterns") else o.targets
        found = select_linears(model, patterns, o.exclude)
        if not found:
            raise ValueError(f"adapter.targets matched no nn.Linear module (targets: {patterns})")
        # Models that know their original checkpoint names (the Anima DiT) get ComfyUI-loadable keys.
        namer = getattr(model, "original_module_name", None)
        for name, linear in found.items():
            rank = rank_for(name, o.rank, o.rank_by_regex)
            self.network.add(lora_key(namer(name) if namer else name, self.prefix),
                             LoRAModule(linear, rank, o.alpha if o.alpha is not None else rank, o.dropout,
                                        o.rs_lora))

    def get_param_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in self.network.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.network.state_dict_for_file()

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        missing, unexpected = self.network.load_file_state(tensors)
        if strict and (missing or unexpected):
            raise ValueError(f"LoRA state does not match: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")

    def save(self, path: Path | str, metadata: Mapping[str, str] | None = None, *,
             dtype: torch.dtype | None = None) -> None:
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.options.rank),
                "ss_network_alpha": str(self.options.alpha if self.options.alpha is not None else self.options.rank),
                "anima_adapter": "lora"}
        meta.update(metadata or {})
        save_file(self.network.state_dict_for_file(dtype), path, meta)

    def load(self, path: Path | str) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)), strict=True)

    def set_multiplier(self, value: float) -> None:
        for mod in self.network.loras.values():
            mod.multiplier = value

    def merge(self) -> None:
        for mod in self.network.loras.values():
            mod.merge()

    def unmerge(self) -> None:
        for mod in self.network.loras.values():
            mod.unmerge()
