"""fp8 base weights: frozen ``nn.Linear`` weights stored as ``float8_e4m3fn`` with one fp32 scale per tensor
(``w ≈ q · scale``, scale = amax / 448) and computed in the model dtype.

Why our own small module rather than diffusers' layerwise casting hooks or torchao:

- diffusers' ``apply_layerwise_casting`` stores weights in fp8 *without a scale*. At Anima's weight scale
  (std ≈ 0.02) about half of them fall into e4m3's subnormal range (1–3 significant bits): 1.20× our output error
  per Linear, and 9.4× at std 0.002 (``bench/fp8_error.py``); a per-tensor scale keeps it at ~2.6 % at any scale.
- ComfyUI's fp8 files are per-tensor scaled (``scale_weight`` / ``weight_scale``), so reading them exactly needs the
  same representation; torchao's float8 weight-only config is per-row and a tensor subclass we cannot fill from
  such a file without re-quantising.
- The backward re-dequantises from the fp8 bytes instead of saving the dequantised weight, so training without
  gradient checkpointing does not hold a bf16 copy of every weight until backward.

File layouts read (as ComfyUI writes them): ``<layer>.weight`` in F8_E4M3 (or F8_E5M2) with a scalar
``<layer>.scale_weight`` (legacy ``scaled_fp8`` files, which also carry a ``scaled_fp8`` marker tensor and sometimes
``<layer>.scale_input``) or ``<layer>.weight_scale`` (the newer ``_quantization_metadata`` layout, optionally with
``<layer>.input_scale`` / ``<layer>.comfy_quant``). Input scales are ignored: we compute in the model dtype. An fp8
weight with no scale is read with scale 1 (a plain fp8 cast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = ("scale_weight", "weight_scale")
# Keys of quantised files that carry no weight of their own.
EXTRA_SUFFIXES = ("scale_input", "input_scale", "comfy_quant")
MARKER_KEY = "scaled_fp8"


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 tensor, fp32 scalar scale) with ``weight ≈ q · scale`` (round to nearest, amax maps to 448)."""
    w = weight.detach()
    # max |w| without an abs() copy, and the scaling in place on the one fp32 copy: 1.7x faster than the plain
    # expression on a block Linear, bit for bit the same (quantising is most of an fp8 load's time)
    amax = (torch.linalg.vector_norm(w, ord=float("inf")).float() if w.numel()
            else torch.zeros((), device=w.device))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(torch.float32)
    q = w.float().div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.reshape(())


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # In the compute dtype, as ComfyUI's manual cast does (weight.to(dtype) * scale).
    return q.to(dtype) * scale.to(dtype)


class _ScaledFp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias, dtype):
        ctx.save_for_backward(q, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        b = bias.to(dtype) if bias is not None else None
        return F.linear(x.to(dtype), dequantize(q, scale, dtype), b)

    @staticmethod
    def backward(ctx, grad_out):
        q, scale = ctx.saved_tensors
        grad_x = grad_out.to(ctx.dtype) @ dequantize(q, scale, ctx.dtype)  # the frozen weight gets no gradient
        return grad_x.to(ctx.x_dtype), None, None, None, None


class ScaledFp8Linear(nn.Linear):
    """An ``nn.Linear`` (so adapters' target selection finds it) whose frozen weight is fp8 + a per-tensor scale.

    Its state dict holds ``weight`` (fp8) and ``scale_weight`` (fp32 scalar), ComfyUI's legacy key names. Do not
    ``.to(dtype)`` a model holding these: that would cast the fp8 bytes; move with ``.to(device)`` only.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, compute_dtype: torch.dtype,
                 device=None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=FP8, device=device),
                                   requires_grad=False)
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaledFp8Linear.apply(x, self.weight, self.scale_weight, self.bias, self.compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.weight, self.scale_weight, dtype or self.compute_dtype)

    @torch.no_grad()
    def add_to_weight_(self, delta: torch.Tensor) -> None:
        """W += delta, re-quantised with a fresh scale (merging a LoRA into an fp8 base is lossy by nature)."""
        q, scale = quantize(self.dequantized_weight(torch.float32) + delta.float())
        self.weight.data, self.scale_weight.data = q, scale.to(self.scale_weight.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 scaled, compute_dtype={self.compute_dtype}"


def replace_linears_(module: nn.Module, compute_dtype: torch.dtype,
                     predicate: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Swap every ``nn.Linear`` under ``module`` (that ``predicate(path, linear)`` accepts) for an *empty*
    :class:`ScaledFp8Linear` on the same device (meta included); returns the paths. The caller fills them."""
    done = []
    for path, linear in list(module.named_modules()):
        if type(linear) is not nn.Linear or (predicate is not None and not predicate(path, linear)):
            continue
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, name, ScaledFp8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                              compute_dtype=compute_dtype, device=linear.weight.device))
        done.append(path)
    return done


@torch.no_grad()
def quantize_linears_(module: nn.Module, compute_dtype: torch.dtype,
                      predicate: Callable[[str, nn.Linear], bool] | None = None) -> int:
    """Quantise the weights of every (accepted) ``nn.Linear`` under ``module`` in place; works on meta tensors.
    Returns the number of Linears replaced."""
    originals = {p: m for p, m in module.named_modules() if type(m) is nn.Linear
                 and (predicate is None or predicate(p, m))}
    replace_linears_(module, compute_dtype, lambda p, m: p in originals)
    for path, linear in originals.items():
        target = module.get_submodule(path)
        q, scale = quantize(linear.weight)
        target.weight.data, target.scale_weight.data = q, scale
        if linear.bias is not None:
            target.bias.data = linear.bias.detach().to(compute_dtype)
    return len(originals)


def resident_weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (what the base weights occupy)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def is_quantized_file_key(key: str) -> bool:
    """Keys of a ComfyUI fp8 file that are not weights of the model (scales, markers)."""
    return key == MARKER_KEY or key.rsplit(".", 1)[-1] in SCALE_SUFFIXES + EXTRA_SUFFIXES


def scale_key_for(weight_key: str, keys) -> str | None:
    """The file key holding the scale of ``<layer>.weight``, if the file has one."""
    stem = weight_key[: -len("weight")]
    for suffix in SCALE_SUFFIXES:
        if stem + suffix in keys:
            return stem + suffix
    return None


def cast_floating_(module: nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` for every floating tensor except fp8 weights and their scales."""
    for sub in module.modules():
        if isinstance(sub, ScaledFp8Linear):
            if sub.bias is not None:
                sub.bias.data = sub.bias.data.to(dtype)
            continue
        for name, p in sub.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype not in FP8_DTYPES:
                p.data = p.data.to(dtype)
        for name, b in sub.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype not in FP8_DTYPES:
                setattr(sub, name, b.to(dtype))


def write_scaled_fp8_file(tensors: Mapping[str, torch.Tensor], path: Path | str,
                          quantize_key: Callable[[str], bool], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a ComfyUI legacy scaled-fp8 file: each ``*.weight`` accepted by ``quantize_key`` in
    F8_E4M3 with a scalar fp32 ``*.scale_weight``, plus the ``scaled_fp8`` marker; everything else unchanged."""
    from anima_core.lora import save_file

    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(".weight") and value.dim() == 2 and quantize_key(key):
            q, scale = quantize(value)
            out[key], out[key[: -len("weight")] + "scale_weight"] = q, scale
        else:
            out[key] = value.contiguous()
    out[MARKER_KEY] = torch.empty(0, dtype=FP8)
    save_file(out, path, metadata)
