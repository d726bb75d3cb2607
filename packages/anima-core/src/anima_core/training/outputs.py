"""LoRA files as ComfyUI, sd-scripts and AnimaLoraStudio read them: ``lora_unet_<original path>`` keys with
kohya ``ss_*`` and ``modelspec.*`` metadata; optionally a diffusers/PEFT copy."""

from __future__ import annotations

import functools
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_warned_no_dtype: set[Callable] = set()


@functools.lru_cache(maxsize=None)
def _save_takes_dtype(fn: Callable) -> bool:
    """Whether an adapter's ``save`` accepts ``dtype=`` (the contract) or only ``(path, metadata)`` (the signature
    documented before); inspected once per function."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: make the documented call
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == "dtype" and p.kind is not p.POSITIONAL_ONLY) for p in params)


def _floating_dtypes(path: Path | str) -> dict[str, str]:
    """Safetensors dtype of every floating, non-scalar tensor in a file (header only)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            part = f.get_slice(key)
            shape = part.get_shape()
            if part.get_dtype() in _FLOATING and len(shape) and any(n != 1 for n in shape):
                out[key] = part.get_dtype()
    return out


def save_adapter(adapter: Any, path: Path | str, metadata: Mapping[str, str],
                 dtype: torch.dtype | None = None) -> None:
    """Write an adapter file the way :class:`anima_core.protocols.AdapterProtocol` documents:
    ``save(path, metadata, dtype=dtype)``, or ``save(path, metadata)`` when no dtype is asked for (states).

    An adapter written to the older ``save(path, metadata=None)`` signature is called without ``dtype``; its file is
    then in the adapter's own precision (core does not cast a plugin's file: it cannot know which of a foreign
    format's tensors may be rounded), and if that differs from ``dtype`` one warning per run says so."""
    save = adapter.save
    fn = getattr(save, "__func__", save)
    if dtype is None:
        save(path, metadata)
        return
    if _save_takes_dtype(fn):
        save(path, metadata, dtype=dtype)
        return
    save(path, metadata)
    want = _SAFETENSORS_NAMES.get(dtype, str(dtype))
    other = sorted({d for d in _floating_dtypes(path).values() if d != want})
    if other and fn not in _warned_no_dtype:
        _warned_no_dtype.add(fn)
        name = getattr(fn, "__qualname__", repr(fn))
        print(f"warning: the adapter's save() ({name}) takes no dtype argument, so LoRA files are written in its own "
              f"precision ({', '.join(other)}), not output.save_dtype ({want}); the plugin should accept "
              f"save(path, metadata=None, *, dtype=None) and cast", file=sys.stderr)


def lora_metadata(config, *, steps: int, epoch: int, adapter_name: str) -> dict[str, str]:
    a = config.adapter
    dataset = config.dataset
    meta = {
        "ss_network_module": "networks.lora" if adapter_name == "lora" else f"anima.{adapter_name}",
        "ss_network_dim": str(getattr(a, "rank", "")),
        "ss_network_alpha": str(getattr(a, "alpha", "")),
        "ss_network_args": json.dumps(a.model_dump(mode="json", exclude={"type"})),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_resolution": json.dumps(dataset.resolution),
        "ss_base_model_version": "anima",
        "ss_learning_rate": str(config.optimizer.lr),
        "ss_optimizer": config.optimizer.type,
        "ss_lr_scheduler": config.lr_scheduler.type,
        "ss_timestep_sampling": config.timestep_sampler.type,
        "ss_loss_type": config.loss.type,
        "ss_batch_size_per_device": str(config.train.batch_size),
        "ss_gradient_accumulation_steps": str(config.train.grad_accum),
        "ss_mixed_precision": config.train.mixed_precision,
        "ss_seed": str(config.train.seed),
        "ss_training_finished_at": str(int(time.time())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"anima/{adapter_name}",
        "modelspec.implementation": "anima",
        "modelspec.title": config.output.name,
        "modelspec.resolution": f"{dataset.resolution[0]}x{dataset.resolution[0]}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "anima_adapter": adapter_name,
        "anima_config": json.dumps(config.model_dump(mode="json"), default=str),
    }
    return meta


def diffusers_export(tensors: dict[str, torch.Tensor], original_paths: dict[str, str]) -> dict[str, torch.Tensor]:
    """``lora_unet_*`` down/up/alpha → ``diffusion_model.<original>.lora_A/B`` with alpha/rank folded into B
    (diffusers' Anima loader rejects files carrying alpha keys)."""
    from anima_core.model.names import original_path_from_comfy_lora_name

    out: dict[str, torch.Tensor] = {}
    for key in [k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")]:
        original = original_path_from_comfy_lora_name(key, original_paths)
        if original is None:
            continue
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        scale = float(tensors[f"{key}.alpha"]) / down.shape[0] if f"{key}.alpha" in tensors else 1.0
        out[f"diffusion_model.{original}.lora_A.weight"] = down
        out[f"diffusion_model.{original}.lora_B.weight"] = (up.float() * scale).to(up.dtype)
    return out


def save_lora(ctx: Any, name: str) -> Path:
    """Write ``<output>/<name>.safetensors`` (rank 0), atomically, with metadata; returns the path."""
    from anima_core.lora import save_file
    from anima_core.model.lora_files import original_paths

    from anima_core import atomic
    from anima_core.training.finite import NonFiniteError, check_safetensors, describe, nonfinite_names

    cfg = ctx.config
    path = ctx.bootstrap.output_dir / f"{name}.safetensors"
    adapter = ctx.models.adapter
    meta = lora_metadata(cfg, steps=ctx.progress.global_step, epoch=ctx.progress.epoch, adapter_name=cfg.adapter.type)
    # The adapter writes a temp file that is checked before it replaces the LoRA: what is checked is what is
    # written, after the cast to save_dtype (fp16 turns weights past 65504 into inf), whatever the adapter plugin.
    with atomic.atomic_path(path) as tmp:
        save_adapter(adapter, tmp, meta, dtype=SAVE_DTYPES[cfg.output.save_dtype])
        check_safetensors(tmp, path)
    if cfg.output.export_diffusers:
        from safetensors.torch import load_file

        exported = diffusers_export(load_file(str(path)), original_paths(ctx.models.dit))
        target = ctx.bootstrap.output_dir / f"{name}.diffusers.safetensors"
        bad = nonfinite_names(exported)  # alpha folded into B can overflow a half-precision dtype
        if bad:
            raise NonFiniteError(f"refusing to write {target}: {len(bad)} tensor(s) are not finite after folding "
                                 f"alpha in ({describe(bad)}); use output.save_dtype: bf16 or fp32")
        save_file(exported, target, meta)
    return path
