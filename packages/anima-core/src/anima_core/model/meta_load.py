"""Loading without waste: a model is built on the meta device (accelerate's ``init_empty_weights``, buffers kept
real), its keys and shapes are checked against the file's header, and then each tensor is read once, converted
to its final dtype (or fp8) and assigned in place — no random init, no fp32 copy, no second copy of the file. A
tensor already in its final dtype is not copied at all: it is a view of the memory-mapped file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch
from torch import nn

from anima_core.model import fp8
from anima_core.model.checkpoint import CheckpointError, SafetensorsFile, check_strict

M = TypeVar("M", bound=nn.Module)


def build_empty(factory: Callable[[], M]) -> M:
    """``factory()`` with parameters on the meta device; buffers (RoPE tables and the like, which no file holds)
    are computed for real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


# Converting a tensor (to fp8, or to another dtype) frees its read buffer and temporaries while its result lives on.
# glibc's malloc raises its mmap threshold to the size of the largest mmapped block freed (up to 32 MiB), so from
# then on these blocks come from the heap, where the freed ones are trapped between results that stay: without a
# trim, loading the full-size DiT in fp8 peaked at 7.0 GB RSS for 2.2 GB of weights (2.8 GB with it).
RELEASE_EVERY = 256 << 20
_malloc_trim = None  # glibc's malloc_trim, False where there is none


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def _fp8_owners(module: nn.Module) -> set[str]:
    return {path for path, m in module.named_modules() if isinstance(m, fp8.ScaledFp8Linear)}


def _read_dequantized(st: SafetensorsFile, key: str) -> torch.Tensor:
    """A tensor of the file in a plain dtype; an fp8 tensor comes back dequantised in fp32 with its scale."""
    w = st.read(key)
    if w.dtype in fp8.FP8_DTYPES:
        scale_key = fp8.scale_key_for(key, st)
        scale = st.read(scale_key).float().reshape(()) if scale_key else torch.ones(())
        w = fp8.dequantize(w, scale, torch.float32)
    return w


def _read_fp8(st: SafetensorsFile, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (e4m3 bytes, scale) of a weight: taken as is from an e4m3 file, else quantised here."""
    if st.dtype(key) == fp8.FP8:
        scale_key = fp8.scale_key_for(key, st)
        return st.read_mapped(key), (st.read(scale_key).float().reshape(()) if scale_key else torch.ones(()))
    return fp8.quantize(_read_dequantized(st, key))  # an e5m2 weight is dequantised first


def fill_from_file(module: nn.Module, st: SafetensorsFile, key_map: Mapping[str, str], dtype: torch.dtype,
                   rename: Callable[[str], str] = lambda k: k) -> None:
    """Fill ``module`` (built by :func:`build_empty`, fp8 Linears already swapped in) from ``st``: ``key_map``
    maps each of the module's state-dict keys to the file key holding it. Keys and shapes are checked first,
    against the header alone, with our usual one-message error."""
    owners = _fp8_owners(module)
    meta = {mk: torch.empty(st.shape(fk), dtype=st.dtype(fk), device="meta") for mk, fk in key_map.items()}
    for owner in owners:
        meta.setdefault(f"{owner}.scale_weight", torch.empty((), device="meta"))
    check_strict(module, meta, st.field, st.path, rename)
    tensors: dict[str, torch.Tensor] = {}
    converted = 0  # bytes read and converted since the last release of freed memory
    for key, target in module.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in owners and leaf == "scale_weight":
            continue  # read with its weight
        file_key = key_map[key]
        if owner in owners and leaf == "weight":
            tensors[key], tensors[f"{owner}.scale_weight"] = _read_fp8(st, file_key)
            converted += st.nbytes(file_key) if st.dtype(file_key) != fp8.FP8 else 0
        elif st.dtype(file_key) == dtype or not st.dtype(file_key).is_floating_point:
            tensors[key] = st.read_mapped(file_key)  # no conversion: a view of the mapped file, no copy
        else:
            w = _read_dequantized(st, file_key)
            tensors[key] = w.to(dtype) if w.is_floating_point() else w
            converted += st.nbytes(file_key)
        if converted >= RELEASE_EVERY:
            release_freed_memory()
            converted = 0
    release_freed_memory()
    st.close()
    module.load_state_dict(tensors, strict=True, assign=True)
    fp8.cast_floating_(module, dtype)  # buffers computed at build time follow the model dtype, as .to(dtype) did


def rename_map(convert: Callable[[dict], dict], file_keys: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{converted key: original key} for a key converter that only renames (diffusers' single-file converters):
    it is run on the meta tensors and each one is followed by identity."""
    origin = {id(v): k for k, v in file_keys.items()}
    converted = convert(dict(file_keys))
    return {k: origin[id(v)] for k, v in converted.items() if id(v) in origin}



def from_pretrained_safetensors(cls, folder: Path, field: str, **kwargs):
    """``cls.from_pretrained(folder)`` (diffusers or transformers; both build on the meta device) from
    safetensors weights only: a folder holding only pickles (``*.bin``) is refused, never unpickled."""
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.is_file())
        hint = (" It holds pickle weights (.bin/.pt), which anima never loads (they can run code): convert them to "
                "safetensors." if any(p.endswith((".bin", ".pt", ".pth", ".ckpt")) for p in found) else "")
        listing = ", ".join(found[:6]) or "nothing"
        raise CheckpointError(f"{field}: {folder} has no .safetensors weights (found: {listing}).{hint}")
    try:
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{field}: cannot load {folder}: {exc}") from None
