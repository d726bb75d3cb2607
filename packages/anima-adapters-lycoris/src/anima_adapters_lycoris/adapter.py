"""The lycoris adapter: lycoris-lora's own module classes (``LokrModule``, ``LohaModule``, ``LoConModule``) on the
Linears core's target logic selects, named ``lora_unet_<original path>``.

lycoris' ``LycorisNetwork``/``create_lycoris`` are not used: they choose modules through a preset stored as
class-level state (it leaks between networks in one process) and name them after the wrapped module tree
(diffusers names, or the ``lycoris_`` prefix ComfyUI ignores). Building the modules directly keeps every setting on
the instance and the keys ComfyUI-loadable.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from anima_adapters_lycoris import file_format
from anima_core.builtins.adapters import LLM_ADAPTER_TARGETS
from anima_core.lora import lora_key, rank_for, save_file, select_linears


def stores_8bit(linear: nn.Module) -> bool:
    """The Linear keeps its frozen weight in an 8-bit float (anima-core's fp8 base)."""
    weight = getattr(linear, "weight", None)
    return weight is not None and weight.is_floating_point() and weight.element_size() == 1

class DeviceSafeLokrModule(LokrModule):
    """lycoris 4.1.3's LoKr draws the rank-dropout mask on the CPU and multiplies it into a weight that may live on
    the GPU (the bug the reference patched in lycoris 3.4.0, still there). Same CPU draw, mask moved to the weight,
    so CPU results and the RNG stream are unchanged."""

    def get_weight(self, shape):
        if not (self.training and self.rank_dropout):
            return super().get_weight(shape)
        rank_dropout, self.rank_dropout = self.rank_dropout, 0
        try:
            weight = super().get_weight(shape)
        finally:
            self.rank_dropout = rank_dropout
        drop = (torch.rand(weight.size(0)) > rank_dropout).to(device=weight.device, dtype=weight.dtype)
        drop = drop.view(-1, *[1] * (weight.dim() - 1))
        if self.rank_dropout_scale:
            drop = drop / drop.mean()
        return weight * drop


MODULES = {"lokr": DeviceSafeLokrModule, "loha": LohaModule, "locon": LoConModule}
PREFIX = "lora_unet_"


@contextlib.contextmanager
def quiet_lycoris() -> Iterator[io.StringIO]:
    """Swallow lycoris' per-layer prints and log lines during construction (one summary is ours to give)."""
    log = logging.getLogger("LyCORIS")
    level = log.level
    log.setLevel(logging.ERROR)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        log.setLevel(level)


def is_full_matrix(module: nn.Module) -> bool:
    return bool(getattr(module, "use_w1", False) and getattr(module, "use_w2", False))


class LycorisModules(nn.Module):
    """The lycoris modules of one model as children named by their file key, so ``state_dict()`` is the file."""

    def add(self, key: str, module: nn.Module) -> None:
        self.add_module(key, module)
        module.apply_to()

    def entries(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self._modules.items())


class LycorisAdapter:
    """Satisfies :class:`anima_core.protocols.AdapterProtocol` (plus merge/unmerge, set_multiplier, state_dict)."""

    def __init__(self, options) -> None:  # options: anima_adapters_lycoris.options.LycorisOptions
        self.options = options
        self.algo = options.type
        self.network = LycorisModules()
        self.llm_keys: set[str] = set()
        self.full_matrix_keys: list[str] = []
        self._merged: dict[str, torch.Tensor] = {}

    # -- building ------------------------------------------------------------------------------------------
    def _module_kwargs(self) -> dict:
        o = self.options
        kw = {"use_tucker": False, "weight_decompose": o.dora, "rs_lora": o.rs_lora,
              "bypass_mode": o.effective_bypass(),
              # A [1, in] magnitude: ComfyUI then normalises W + ΔW per input column exactly as lycoris does (its
              # output-axis branch normalises the original W instead, which would not match our training).
              "wd_on_out": False}
        if self.algo == "lokr":
            kw.update(factor=o.factor, decompose_both=o.decompose_both, full_matrix=o.full_matrix)
        return kw

    def inject(self, model: nn.Module) -> None:
        o = self.options
        patterns = o.target_patterns()
        found = select_linears(model, patterns, o.exclude)
        if not found:
            raise ValueError(f"adapter.targets matched no nn.Linear module (targets: {patterns})")
        namer = getattr(model, "original_module_name", None)
        llm = [re.compile(p) for p in LLM_ADAPTER_TARGETS]
        cls, kwargs = MODULES[self.algo], self._module_kwargs()
        with quiet_lycoris():
            for name, linear in found.items():
                rank = rank_for(name, o.rank, o.rank_by_regex)
                key = lora_key(namer(name) if namer else name, PREFIX)
                module_kwargs = kwargs
                if stores_8bit(linear):
                    # An fp8 base (model.base_precision: fp8): the rebuild path adds ΔW to the stored weight,
                    # which fp8 can neither hold nor multiply; bypass computes base(x) + ΔW·x and never touches it.
                    if o.dora:
                        raise ValueError(f"adapter.dora rebuilds the full weight of {name} every forward, which an "
                                         f"fp8 base does not hold: use model.base_precision: dtype with dora")
                    module_kwargs = {**kwargs, "bypass_mode": True}
                module = cls(key, linear, 1.0, rank, o.alpha if o.alpha is not None else rank, o.dropout,
                             o.rank_dropout, o.module_dropout, **module_kwargs)
                if is_full_matrix(module):
                    # ComfyUI applies scale 1 to a LoKr with both factors full; lycoris does too, except with
                    # rs-scaling (√rank). Pin 1 and save alpha = rank so both readings agree.
                    module.scale = 1.0
                    module.alpha.fill_(float(module.lora_dim))
                    self.full_matrix_keys.append(key)
                self.network.add(key, module.to(linear.weight.device))
                if any(p.fullmatch(name) for p in llm):
                    self.llm_keys.add(key)
        if self.full_matrix_keys and not o.full_matrix:
            print(f"warning: LoKr rank {o.rank} ≥ half of lokr_w2's larger side on {len(self.full_matrix_keys)} "
                  f"of {len(found)} layers: they use a full lokr_w2 (scale 1, alpha ignored), e.g. "
                  f"{self.full_matrix_keys[0]}", file=sys.stderr)

    # -- training --------------------------------------------------------------------------------------------
    def get_param_groups(self, weight_decay: float) -> list[dict]:
        dit, adapter = [], []
        for key, module in self.network.entries():
            params = [p for p in module.parameters() if p.requires_grad]
            (adapter if key in self.llm_keys and self.options.llm_adapter_lr is not None else dit).extend(params)
        groups = [{"params": dit, "weight_decay": weight_decay}] if dit else []
        if adapter:
            groups.append({"params": adapter, "weight_decay": weight_decay, "lr": self.options.llm_adapter_lr})
        return groups

    def excludes_weight_decay(self, name: str) -> bool:
        # LoKr's w1 is the small, full factor that sets the update's scale; decaying it shrinks every block.
        return self.algo == "lokr" and "lokr_w1" in name

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for key, tensor in self.network.state_dict().items():
            tensor = tensor.detach()
            # alpha stays fp32: a bf16 alpha (e.g. 8·√8) would shift the scale ComfyUI computes from it.
            if dtype is not None and tensor.is_floating_point() and not key.endswith(".alpha"):
                tensor = tensor.to(dtype)
            out[key] = tensor.contiguous().cpu()
        return out

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        own = self.network.state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"{self.algo} state does not match: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        for key in own.keys() & tensors.keys():
            if tuple(own[key].shape) != tuple(tensors[key].shape):
                raise ValueError(f"{key}: expected shape {tuple(own[key].shape)}, found {tuple(tensors[key].shape)}")
        self.network.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
        for _, module in self.network.entries():
            module.scale = float(module.alpha) / module.lora_dim  # the stored alpha is scale · rank

    def metadata(self) -> dict[str, str]:
        o = self.options
        args = {"algo": self.algo, "preset": "anima", "dropout": o.dropout, "rank_dropout": o.rank_dropout,
                "module_dropout": o.module_dropout, "weight_decompose": o.dora, "wd_on_out": False,
                "rs_lora": o.rs_lora, "bypass_mode": o.effective_bypass(), "rank_by_regex": o.rank_by_regex}
        if self.algo == "lokr":
            args.update(factor=o.factor, full_matrix=o.full_matrix, decompose_both=o.decompose_both)
        return {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(o.rank),
                "ss_network_alpha": str(o.alpha if o.alpha is not None else o.rank),
                "ss_network_args": json.dumps(args), "anima_adapter": self.algo}

    def save(self, path: Path | str, metadata: Mapping[str, str] | None = None, *,
             dtype: torch.dtype | None = None) -> None:
        own = self.metadata()
        meta = {**own, **(metadata or {})}
        # Core's training metadata carries the options as ss_network_args; lycoris readers need algo & co in it.
        given = json.loads((metadata or {}).get("ss_network_args") or "{}")
        meta.update(ss_network_module=own["ss_network_module"], anima_adapter=self.algo,
                    ss_network_args=json.dumps({**given, **json.loads(own["ss_network_args"])}))
        save_file(self.state_dict(dtype), path, meta)

    def load(self, path: Path | str) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)), strict=True)

    # -- inference -----------------------------------------------------------------------------------------------
    def set_multiplier(self, value: float) -> None:
        for _, module in self.network.entries():
            module.multiplier = value

    @torch.no_grad()
    def merge(self) -> None:
        """Fold each ΔW (ComfyUI's reading of our file, times the multiplier) into the base weight."""
        tensors = self.state_dict()
        groups = file_format.group_by_module(tensors)
        for key, module in self.network.entries():
            if key in self._merged:
                continue
            weight = module.org_module[0].weight
            delta = file_format.module_delta(key, groups[key], weight) * module.multiplier
            weight += delta.to(weight.device, weight.dtype)
            module.restore()  # the forward stops adding the update; the weight now holds it
            self._merged[key] = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        for key, module in self.network.entries():
            delta = self._merged.pop(key, None)
            if delta is not None:
                weight = module.org_module[0].weight
                weight -= delta.to(weight.device, weight.dtype)
                module.apply_to()
