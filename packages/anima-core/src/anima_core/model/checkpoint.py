"""Reading model files users have, with one clear message per problem: which file, what was expected, what was
found. Only safetensors are read: pickle-based checkpoints (.ckpt/.pt/.bin) are refused, never unpickled."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

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


def _check_header(path: Path, field: str) -> None:
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
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{field}: {path} is truncated: tensors need {8 + n + end} bytes, the file has "
                              f"{size} (re-download it)")


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


def load_strict(module, sd: dict[str, "torch.Tensor"], field: str, path: Path | str, rename=lambda k: k) -> None:
    """``module.load_state_dict(sd, strict=True)``, but a mismatch is one :class:`CheckpointError` naming the file,
    the counts and examples (by ``rename``d names, e.g. the original checkpoint names)."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(key_mismatch_message(field, path, missing, unexpected, rename))
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if v.shape != own[k].shape]
    if wrong:
        k, found, want = wrong[0]
        raise CheckpointError(f"{field}: {path}: {len(wrong)} tensors have unexpected shapes (e.g. {rename(k)}: "
                              f"expected {want}, found {found})")
    module.load_state_dict(sd, strict=True)


def key_mismatch_message(field: str, path: Path | str, missing: list[str], unexpected: list[str],
                         rename=lambda k: k) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(rename(k) for k in missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(rename(k) for k in unexpected[:3])})")
    return f"{field}: {path} does not match the expected layout: {'; '.join(parts)} keys"
