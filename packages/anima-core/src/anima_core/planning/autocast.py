"""CUDA autocast's casting policy, applied to CPU (fake) tensors.

The plan runs on the CPU device type, where ``torch.autocast("cpu")`` follows a different op list than CUDA's (on
CUDA ``layer_norm``, ``softmax``, ``exp``, ``sum``, ``pow`` ... run in fp32; on the CPU they stay in bf16), and the
dtype of every saved activation follows from that list. This mode reproduces CUDA's policy at the Python function
level (above autograd, where autocast acts): the documented CUDA op lists of ``torch.amp`` (ops that autocast to the
lower precision, to float32, and to the widest input type), the per-region cache of casts of fp32 leaf tensors
that require grad (the LoRA weights), and its clearing when the outermost region exits. Ops outside the lists run
as called. Gradient checkpointing's recompute re-enters the same policy, as it re-enters autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# torch.amp "CUDA Ops that can autocast to float16/bfloat16" (+ scaled_dot_product_attention, in the CUDA list
# since torch 2.0)
LOWER_PRECISION = frozenset({
    "__matmul__", "__rmatmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "matmul",
    "mm", "mv", "prelu", "scaled_dot_product_attention", "_convolution", "convolution", "conv_tbc",
})
# "CUDA Ops that can autocast to float32"
FLOAT32 = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
    "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
    "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
    "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "triplet_margin_loss",
})
# "CUDA Ops that can autocast to the widest input type"
PROMOTE = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sample", "index_put",
                     "scatter_add", "tensordot"})

_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)


class CudaAutocast(TorchFunctionMode):
    """``with CudaAutocast(torch.bfloat16):`` ≈ ``with torch.autocast("cuda", torch.bfloat16):`` on any device."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self._depth = 0
        self._cache: weakref.WeakKeyDictionary | dict = {}

    def __enter__(self):
        if self._depth == 0:
            self._cache = {}
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._cache = {}  # autocast clears its cast cache when the outermost region exits
        return super().__exit__(*exc)

    @property
    def active(self) -> bool:
        return self._depth > 0

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not isinstance(value, torch.Tensor) or value.dtype not in _CASTABLE or value.dtype == dtype:
            return value
        cacheable = (dtype == self.dtype and value.dtype == torch.float32 and value.requires_grad and value.is_leaf)
        if cacheable:
            hit = self._cache.get(id(value))
            if hit is not None and hit[0]() is value:
                return hit[1]
        out = value.to(dtype)
        if cacheable:
            self._cache[id(value)] = (weakref.ref(value), out)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in LOWER_PRECISION:
            target = self.dtype
        elif name in FLOAT32:
            target = torch.float32
        elif name in PROMOTE:
            found = [a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
                     and a.dtype in _CASTABLE]
            target = max(found, key=lambda d: torch.finfo(d).bits) if found else None
        else:
            target = None
        if target is not None:
            args = tree_map(lambda a: self._cast(a, target), args)
            kwargs = tree_map(lambda a: self._cast(a, target), kwargs)
        return func(*args, **kwargs)


def autocast_for(mixed_precision: str) -> CudaAutocast | contextlib.nullcontext:
    """The policy of ``train.mixed_precision`` (``bf16``, ``fp16`` or ``no``)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return CudaAutocast(torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def checkpoint_function(policy: Any):
    """A diffusers ``gradient_checkpointing_func`` (non-reentrant ``torch.utils.checkpoint``, as diffusers' default)
    whose recompute re-enters ``policy`` when it was active in the forward, as CUDA autocast is re-entered."""
    import torch.utils.checkpoint as ckpt

    def context_fn():
        if isinstance(policy, CudaAutocast) and policy.active:
            return contextlib.nullcontext(), _Reenter(policy)
        return contextlib.nullcontext(), contextlib.nullcontext()

    def run(module, *args):
        return ckpt.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn)

    return run


class _Reenter:
    def __init__(self, policy: CudaAutocast) -> None:
        self.policy = policy

    def __enter__(self):
        return self.policy.__enter__()

    def __exit__(self, *exc: Any) -> None:
        return self.policy.__exit__(*exc)
