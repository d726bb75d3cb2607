"""Reading model files users have, with one clear message per problem: which file, what was expected, what was
found. Only safetensors are read: pickle-based checkpoints (.ckpt/.pt/.bin) are refused, never unpickled."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from anima_core.errors import UserError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}

# Key fingerprints of each component, after any prefix is stripped.
COMPONENT_HINTS = {
    "anima_dit": ("blocks.0.mlp.layer1.weight", "x_embedder.proj.1.weight"),
    "diffusers_dit": ("transformer_blocks.0.ff.net.0.proj.weight", "patch_embed.proj.weight"),
    "qwen3": ("layers.0.self_attn.q_proj.weight", "embed_tokens.weight"),
    "wan_vae": ("encoder.conv1.weight", "decoder.conv1.weight"),
    "diffusers_vae": ("encoder.conv_in.weight", "decoder.conv_in.weight"),
}
COMPONENT_NAMES = {
    "anima_dit": "the Anima DiT (+ llm_adapter) single file",
    "diffusers_dit": "a diffusers-format Cosmos DiT",
    "qwen3": "a Qwen3 text encoder",
    "wan_vae": "the Qwen-Image / Wan2.1 VAE",
    "diffusers_vae": "a diffusers-format VAE",
}
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "net.", "model.", "")


class CheckpointError(UserError):
    """A model file that cannot be used as the component it was given for."""


def describe_component(keys: Iterable[str]) -> str:
    """What a key set looks like (for 'expected X, found Y' messages)."""
    keys = list(keys)
    for kind, fingerprint in COMPONENT_HINTS.items():
        if all(any(k.endswith(f) for k in keys) for f in fingerprint):
            return COMPONENT_NAMES[kind]
    sample = ", ".join(sorted(keys)[:3])
    return f"an unrecognised file ({len(keys)} tensors, e.g. {sample})"


def check_file(path: Path | str, field: str, expected: str) -> Path:
    """``path`` must be an existing safetensors file (not a pickle)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{field}: file not found: {path} (expected {expected})")
    if path.is_dir():
        raise CheckpointError(f"{field}: expected {expected} as a .safetensors file, found a directory without a "
                              f"diffusers config: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{field}: {path} is a pickle-based checkpoint ({path.suffix}); anima reads only "
                              f".safetensors files (pickles can run code when loaded). Convert it to safetensors.")
    return path


# safetensors dtype codes; the torch names are resolved lazily so importing this module stays cheap.
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool"}
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U8": 1, "BOOL": 1}


def read_header(path: Path, field: str) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict, int]:
    """The header of a safetensors file, validated: {name: (dtype code, shape, start, end)}, the metadata and the
    offset where tensor data starts. Every malformation is one :class:`CheckpointError` naming the file."""
    # safetensors' own errors ("Error while deserializing header: ...") do not say which file or what to do.
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{field}: {path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{field}: {path} is not a safetensors file, or is truncated (header claims "
                                  f"{n} bytes, file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{field}: {path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{field}: {path} is not a safetensors file (its header is a JSON "
                              f"{type(header).__name__}, expected an object of tensors)")
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        try:
            code, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            numel = 1
            for d in shape:
                numel *= d
            valid = code in ITEM_SIZES and 0 <= int(start) <= int(end) and int(end) - int(start) == numel * \
                ITEM_SIZES[code] and all(d >= 0 for d in shape)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{field}: {path} is not a valid safetensors file: the header entry of {name!r} "
                                  f"is malformed ({json.dumps(info)[:120]})")
        entries[name] = (code, shape, int(start), int(end))
    end = max((e[3] for e in entries.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{field}: {path} is truncated: tensors need {8 + n + end} bytes, the file has "
                              f"{size} (re-download it)")
    return entries, metadata if isinstance(metadata, dict) else {}, 8 + n


def _check_header(path: Path, field: str) -> None:
    read_header(path, field)


class SafetensorsFile:
    """A safetensors file read one tensor at a time, the header up front; never reads a tensor not asked for.

    Two ways to read a tensor, so that loading a model holds each weight once:

    - :meth:`read` copies it with plain reads into a fresh buffer: for tensors that are converted next (another
      dtype, fp8), so the buffer is freed after conversion and no file pages stay mapped beside the copy.
    - :meth:`read_mapped` returns a copy-on-write view of a memory map of the file: for tensors kept as they are.
      Nothing is copied; the page cache's pages are the tensor's memory (they count in RSS as file pages, and the
      kernel can drop and re-read them under memory pressure), as safetensors' own ``load_file`` does. Copying
      instead costs a first-touch page fault per 4 KiB of fresh memory plus the copy: 1.35× a bare safetensors
      pread and 11× its mmap read on the full-size DiT file (``bench/load_memory.py``). A write to such a tensor
      (merging a LoRA) copies just the pages written. The file should not be rewritten in place while its tensors
      are alive (moving them to the GPU or into block swap's buffers releases them).
    """

    def __init__(self, path: Path | str, field: str, expected: str) -> None:
        self.path = check_file(path, field, expected)
        self.field = field
        self._entries, self.metadata, self._data_start = read_header(self.path, field)
        self._map = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def dtype(self, key: str) -> "torch.dtype":
        import torch

        return getattr(torch, ST_DTYPES[self._entries[key][0]])

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def nbytes(self, key: str | None = None) -> int:
        if key is not None:
            _, _, start, end = self._entries[key]
            return end - start
        return sum(e[3] - e[2] for e in self._entries.values())

    def meta_state_dict(self) -> dict[str, "torch.Tensor"]:
        """Every tensor as a meta tensor of its shape and dtype (for reading off configs without any data)."""
        import torch

        return {k: torch.empty(self.shape(k), dtype=self.dtype(k), device="meta") for k in self._entries}

    def read(self, key: str) -> "torch.Tensor":
        import torch

        code, shape, start, end = self._entries[key]
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        try:
            with open(self.path, "rb", buffering=0) as fh:
                fh.seek(self._data_start + start)
                done = 0
                while done < len(view):
                    got = fh.readinto(view[done:])
                    if not got:
                        raise CheckpointError(f"{self.field}: {self.path} ended while reading {key} (truncated "
                                              f"file? re-download it)")
                    done += got
        except OSError as exc:
            raise CheckpointError(f"{self.field}: cannot read {self.path}: {exc}") from None
        return buf.view(self.dtype(key)).reshape(shape)

    def read_mapped(self, key: str) -> "torch.Tensor":
        """The tensor as a copy-on-write view of the memory-mapped file (see the class docstring); a plain
        :meth:`read` where mapping is not possible (empty or misaligned tensor, a system refusing the map)."""
        import torch

        code, shape, start, end = self._entries[key]
        offset = self._data_start + start
        if end == start or offset % ITEM_SIZES[code]:
            return self.read(key)
        if self._map is None:
            import mmap

            try:
                with open(self.path, "rb") as fh:
                    self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):
                self._map = False
        if self._map is False:
            return self.read(key)
        buf = torch.frombuffer(self._map, dtype=torch.uint8, count=end - start, offset=offset)
        return buf.view(self.dtype(key)).reshape(shape)

    def close(self) -> None:
        """Drop this object's reference to the memory map; tensors read from it keep it alive until freed."""
        self._map = None


def load_safetensors(path: Path | str, field: str, expected: str) -> tuple[dict[str, "torch.Tensor"], dict]:
    """All tensors (on the CPU) and the metadata of a safetensors file, or a :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    path = check_file(path, field, expected)
    _check_header(path, field)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{field}: cannot read {path} as safetensors: {exc}") from None
    return tensors, metadata


def strip_prefix(tensors: dict[str, "torch.Tensor"], anchor: str) -> tuple[dict[str, "torch.Tensor"], str]:
    """Remove the first known prefix under which ``anchor`` (a key that must exist) is found."""
    for prefix in KNOWN_PREFIXES:
        if prefix + anchor in tensors:
            if not prefix:
                return tensors, ""
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, prefix
    return tensors, ""


def block_count(keys: Iterable[str], pattern: str) -> int:
    """Number of distinct N in keys matching ``pattern`` (a regex with one group for N)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def check_strict(module, sd: Mapping[str, "torch.Tensor"], field: str, path: Path | str,
                 rename=lambda k: k) -> None:
    """The keys and shapes of ``sd`` must be exactly ``module``'s (meta tensors suffice on both sides); a mismatch
    is one :class:`CheckpointError` naming the file, the counts and examples (by ``rename``d names, e.g. the
    original checkpoint names)."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(key_mismatch_message(field, path, missing, unexpected, rename))
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if v.shape != own[k].shape]
    if wrong:
        k, found, want = wrong[0]
        raise CheckpointError(f"{field}: {path}: {len(wrong)} tensors have unexpected shapes (e.g. {rename(k)}: "
                              f"expected {want}, found {found})")


def load_strict(module, sd: dict[str, "torch.Tensor"], field: str, path: Path | str, rename=lambda k: k) -> None:
    """``module.load_state_dict(sd, strict=True)`` after :func:`check_strict`."""
    check_strict(module, sd, field, path, rename)
    module.load_state_dict(sd, strict=True)


def key_mismatch_message(field: str, path: Path | str, missing: list[str], unexpected: list[str],
                         rename=lambda k: k) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(rename(k) for k in missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(rename(k) for k in unexpected[:3])})")
    return f"{field}: {path} does not match the expected layout: {'; '.join(parts)} keys"
