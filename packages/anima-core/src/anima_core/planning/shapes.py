"""Model shapes without tensor data: safetensors headers (or diffusers/HF ``config.json`` files) → the constructor
configs of the DiT, the LLM adapter, Qwen3 and the VAE, plus the published Anima shapes for planning before anything
is downloaded.

Only the 8-byte length and the JSON header of each file are read; a file whose data section is missing still plans
(with a warning: training would fail to load it)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from anima_core.model.checkpoint import PICKLE_SUFFIXES, CheckpointError, describe_component, strip_prefix

# safetensors dtype tag → (torch dtype name, bytes per element)
ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
             "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
             "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}

ARCHITECTURES = ("anima-2b",)

# The released Anima model set (circlestone-labs/Anima split_files, anima-model.md §1): the DiT in our 17-channel
# construction (16 latent + the zero mask channel fed as condition_mask, see anima_core.model.dit), the LLM adapter
# (AnimaTextConditioner defaults), Qwen3-0.6B-Base and the Qwen-Image VAE. The files are assumed to be bf16.
ANIMA_2B = {
    "dit": {"in_channels": 17, "out_channels": 16, "num_attention_heads": 16, "attention_head_dim": 128,
            "num_layers": 28, "mlp_ratio": 4.0, "text_embed_dim": 1024, "adaln_lora_dim": 256,
            "concat_padding_mask": False},
    "adapter": {"source_dim": 1024, "target_dim": 1024, "model_dim": 1024, "num_layers": 6,
                "num_attention_heads": 16, "mlp_ratio": 4.0, "target_vocab_size": 32128, "use_self_attention": True},
    "qwen": {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128},
    "vae": {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
            "temperal_downsample": [False, True, True]},
}
PUBLISHED_FILE_DTYPE = "bfloat16"


@dataclass
class HeaderTensor:
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class ComponentFiles:
    """Where a component's shapes came from and what its files weigh on disk."""

    source: str  # a path, or "anima-2b (published shapes)"
    file_bytes: int  # bytes a load maps/reads (0 when unknown)
    file_dtype: Optional[str] = None  # the dominant floating dtype of the file(s)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ModelShapes:
    """Constructor kwargs of every component (``dit``/``adapter`` as in :mod:`anima_core.model.dit`, ``qwen`` for
    ``Qwen3Config``, ``vae`` for ``AutoencoderKLQwenImage``) and their files."""

    dit: dict[str, Any]
    adapter: dict[str, Any]
    qwen: dict[str, Any]
    vae: dict[str, Any]
    files: dict[str, ComponentFiles]  # keys: transformer, text_encoder, vae
    architecture: Optional[str] = None

    @property
    def warnings(self) -> list[str]:
        return [w for f in self.files.values() for w in f.warnings]


def read_header(path: Path | str, field_name: str) -> tuple[dict[str, HeaderTensor], list[str]]:
    """Tensor dtypes and shapes of a safetensors file from its header alone; (tensors, warnings)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{field_name}: file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{field_name}: expected a .safetensors file, found a directory: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{field_name}: {path} is a pickle-based checkpoint ({path.suffix}); anima reads only "
                              f".safetensors files")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{field_name}: {path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or 8 + n > size:
            raise CheckpointError(f"{field_name}: {path} is not a safetensors file, or its header is truncated "
                                  f"(header claims {n} bytes, the file has {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a mapping")
        tensors: dict[str, HeaderTensor] = {}
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            name, width = ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, stop = (int(x) for x in info["data_offsets"])
            count = 1
            for d in shape:
                count *= d
            tensors[key] = HeaderTensor(name, shape, count * width)
            end = max(end, stop)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{field_name}: {path} has an unreadable safetensors header ({exc})") from None
    warnings = []
    if 8 + n + end > size:
        warnings.append(f"{field_name}: {path} is truncated (its tensors need {8 + n + end} bytes, the file has "
                        f"{size}): planning uses the header only, but training cannot load it (re-download it)")
    return tensors, warnings


def meta_state_dict(tensors: dict[str, HeaderTensor]) -> dict[str, Any]:
    """Meta tensors of the header's shapes and dtypes (what ``infer_*_config`` need: ``.shape`` only)."""
    import torch

    return {k: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="meta") for k, t in tensors.items()}


def _dominant_dtype(tensors: dict[str, HeaderTensor]) -> Optional[str]:
    weight: dict[str, int] = {}
    for t in tensors.values():
        weight[t.dtype] = weight.get(t.dtype, 0) + t.nbytes
    return max(weight, key=weight.get) if weight else None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def _read_json(path: Path, field_name: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{field_name}: cannot read {path}: {exc}") from None


def transformer_shapes(path: Path | str) -> tuple[dict, dict, ComponentFiles]:
    """``model.transformer``: the single file (DiT + ``llm_adapter.*``) or a diffusers folder."""
    from anima_core.model.dit import ADAPTER_PREFIX, DIT_FIXED, EXPECTED, FIELD, infer_adapter_config, infer_dit_config

    path = Path(path)
    if path.is_dir():
        root = path if (path / "transformer").is_dir() else path.parent
        tdir, cdir = root / "transformer", root / "text_conditioner"
        if not (tdir / "config.json").exists() or not (cdir / "config.json").exists():
            raise CheckpointError(f"{FIELD}: {path} is a directory but not a diffusers Anima folder (expected "
                                  f"transformer/ and text_conditioner/ with config.json)")
        dit = {k: v for k, v in _read_json(tdir / "config.json", FIELD).items() if not k.startswith("_")}
        if dit.get("concat_padding_mask", True):
            dit.update(in_channels=dit.get("in_channels", 16) + 1, concat_padding_mask=False)
        dit.update(max_size=DIT_FIXED["max_size"])
        adapter = {k: v for k, v in _read_json(cdir / "config.json", FIELD).items() if not k.startswith("_")}
        return dit, adapter, ComponentFiles(str(path), _folder_bytes(tdir) + _folder_bytes(cdir))
    tensors, warnings = read_header(path, FIELD)
    sd, _ = strip_prefix(meta_state_dict(tensors), "x_embedder.proj.1.weight")
    if "x_embedder.proj.1.weight" not in sd or "blocks.0.mlp.layer1.weight" not in sd:
        raise CheckpointError(f"{FIELD}: expected {EXPECTED}, found {describe_component(tensors)} in {path}")
    adapter_sd = {k[len(ADAPTER_PREFIX):]: v for k, v in sd.items() if k.startswith(ADAPTER_PREFIX)}
    if "embed.weight" not in adapter_sd:
        raise CheckpointError(f"{FIELD}: {path} has the DiT but no llm_adapter.* tensors; Anima needs the adapter")
    dit_sd = {k: v for k, v in sd.items() if not k.startswith(ADAPTER_PREFIX)}
    try:
        dit, adapter = infer_dit_config(dit_sd), infer_adapter_config(adapter_sd)
    except KeyError as exc:
        raise CheckpointError(f"{FIELD}: {path} lacks {exc} (truncated header or another architecture?)") from None
    return dit, adapter, ComponentFiles(str(path), path.stat().st_size, _dominant_dtype(tensors), warnings)


def text_encoder_shapes(path: Path | str) -> tuple[dict, ComponentFiles]:
    """``model.text_encoder``: one safetensors file (``model.*`` keys) or a Hugging Face folder."""
    from anima_core.model.text_encoder import EXPECTED, FIELD, QWEN3_FIXED, qwen3_config_from_shapes

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{FIELD}: {path} is a directory without config.json (expected {EXPECTED} or a "
                                  f"Hugging Face Qwen3 folder)")
        cfg = _read_json(path / "config.json", FIELD)
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")
        missing = [k for k in keys if k not in cfg]
        if missing:
            raise CheckpointError(f"{FIELD}: {path / 'config.json'} lacks {', '.join(missing)}")
        return {**QWEN3_FIXED, **{k: cfg[k] for k in keys}}, ComponentFiles(str(path), _folder_bytes(path))
    tensors, warnings = read_header(path, FIELD)
    sd = {k.removeprefix("model."): v for k, v in meta_state_dict(tensors).items() if k != "lm_head.weight"}
    if "embed_tokens.weight" not in sd or "layers.0.self_attn.q_norm.weight" not in sd:
        raise CheckpointError(f"{FIELD}: expected {EXPECTED}, found {describe_component(tensors)} in {path}")
    return qwen3_config_from_shapes(sd), ComponentFiles(str(path), path.stat().st_size, _dominant_dtype(tensors),
                                                        warnings)


def vae_shapes(path: Path | str) -> tuple[dict, ComponentFiles]:
    """``model.vae``: the single file (Wan2.1 or diffusers layout) or a diffusers folder."""
    from anima_core.model.vae import EXPECTED, FIELD, infer_vae_config

    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{FIELD}: {path} is a directory without a diffusers VAE config.json")
        keys = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample")
        cfg = _read_json(folder / "config.json", FIELD)
        return ({k: cfg[k] for k in keys if k in cfg}, ComponentFiles(str(path), _folder_bytes(folder)))
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    tensors, warnings = read_header(path, FIELD)
    raw = meta_state_dict(tensors)
    if "encoder.conv1.weight" in raw and "decoder.conv1.weight" in raw:
        sd = convert_wan_vae_to_diffusers(dict(raw))
    elif "encoder.conv_in.weight" in raw:
        sd = raw
    else:
        raise CheckpointError(f"{FIELD}: expected {EXPECTED}, found {describe_component(tensors)} in {path}")
    try:
        cfg = infer_vae_config(sd)
    except KeyError as exc:
        raise CheckpointError(f"{FIELD}: {path} looks like a VAE but lacks {exc}") from None
    return cfg, ComponentFiles(str(path), path.stat().st_size, _dominant_dtype(tensors), warnings)


def published_shapes(architecture: str = "anima-2b") -> ModelShapes:
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"--architecture: unknown architecture {architecture!r} (known: "
                              f"{', '.join(ARCHITECTURES)})")
    from anima_core.model.dit import DIT_FIXED

    src = f"{architecture} (published shapes)"
    # file_bytes: filled in by the planner from the built modules (parameter count × 2 bytes)
    files = {kind: ComponentFiles(src, 0, PUBLISHED_FILE_DTYPE) for kind in ("transformer", "text_encoder", "vae")}
    return ModelShapes(dit={**ANIMA_2B["dit"], **DIT_FIXED}, adapter=dict(ANIMA_2B["adapter"]),
                       qwen={**_qwen_fixed(), **ANIMA_2B["qwen"]}, vae=dict(ANIMA_2B["vae"]), files=files,
                       architecture=architecture)


def _qwen_fixed() -> dict[str, Any]:
    from anima_core.model.text_encoder import QWEN3_FIXED

    return dict(QWEN3_FIXED)


def shapes_from_config(model_section, architecture: Optional[str] = None) -> ModelShapes:
    """Shapes for a config's ``model`` section. With ``architecture`` the published shapes are used and the paths
    ignored; without it every path must be set (the caller decides the fallback)."""
    if architecture is not None:
        return published_shapes(architecture)
    missing = [name for name in ("transformer", "text_encoder", "vae") if getattr(model_section, name) is None]
    if missing:
        raise CheckpointError(f"model.{missing[0]} is not set: give the model files in the config, or plan the "
                              f"published architecture with --architecture anima-2b")
    dit, adapter, tfiles = transformer_shapes(model_section.transformer)
    qwen, qfiles = text_encoder_shapes(model_section.text_encoder)
    vae, vfiles = vae_shapes(model_section.vae)
    return ModelShapes(dit=dit, adapter=adapter, qwen=qwen, vae=vae,
                       files={"transformer": tfiles, "text_encoder": qfiles, "vae": vfiles})
