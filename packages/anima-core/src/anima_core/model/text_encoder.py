"""Text encoding shared by training and inference.

Rules (each pinned by a test): ComfyUI's weight syntax is parsed and each segment tokenised on its own; Qwen3 gets
the plain segments (no chat template, no BOS/EOS; an empty caption is one pad token, as ComfyUI) and we take the
last hidden state after the final norm, zeroed at padding; T5 ids are the same segments with ``</s>`` appended and
per-token weights. Prompts for inference are never cut (ComfyUI: 512 is the context's padding floor, not a cap);
training captions are cut at 512 Qwen3 and 512 T5 tokens (``MAX_QWEN_TOKENS`` / ``MAX_T5_TOKENS``, as sd-scripts),
with a warning naming the caption files, because a caption past them costs GBs of attention memory per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from anima_core.errors import UserError
from anima_core.model.checkpoint import CheckpointError, SafetensorsFile, block_count, describe_component
from anima_core.model.prompt import parse_weighted

FIELD = "model.text_encoder"
EXPECTED = "the Qwen3-0.6B text encoder (e.g. qwen_3_06b_base.safetensors)"

# Qwen3-0.6B values that tensor shapes do not carry.
QWEN3_FIXED = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
               "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False}

TOKENIZER_HELP = {
    "qwen_tokenizer": ("model.qwen_tokenizer", "the Qwen3 tokenizer (tokenizer.json + tokenizer_config.json)",
                       "Qwen/Qwen3-0.6B-Base or the tokenizer/ folder of circlestone-labs/Anima-Base-v1.0-Diffusers"),
    "t5_tokenizer": ("model.t5_tokenizer", "the T5 tokenizer (tokenizer.json or spiece.model + config)",
                     "google/t5-v1_1-xxl or the t5_tokenizer/ folder of circlestone-labs/Anima-Base-v1.0-Diffusers"),
}


def qwen3_config_from_shapes(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    vocab, hidden = sd["embed_tokens.weight"].shape
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": sd["layers.0.mlp.gate_proj.weight"].shape[0],
        "num_hidden_layers": block_count(sd, r"layers\.(\d+)\."),
        "num_attention_heads": sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        "num_key_value_heads": sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        "head_dim": head_dim,
        **QWEN3_FIXED,
    }


def quantizes(path: str, _linear=None) -> bool:
    """The Qwen3 Linears that ``text_encoder_precision: fp8`` stores in fp8: those of the decoder layers."""
    return path.startswith("layers.")


def load_qwen3(path: Path | str, *, dtype: torch.dtype | str = torch.float32,
               precision: str = "dtype") -> torch.nn.Module:
    """``model.text_encoder``: one safetensors file (``model.*`` keys) or a Hugging Face folder, built on the meta
    device and read tensor by tensor into ``dtype`` (``precision="fp8"``: decoder Linears in fp8), frozen."""
    from transformers import Qwen3Config, Qwen3Model

    from anima_core.model import fp8
    from anima_core.model.meta_load import build_empty, fill_from_file, from_pretrained_safetensors
    from anima_core.model.models import resolve_dtype

    path, dtype = Path(path), resolve_dtype(dtype)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{FIELD}: {path} is a directory without config.json (expected {EXPECTED} or a "
                                  f"Hugging Face Qwen3 folder)")
        model = from_pretrained_safetensors(Qwen3Model, path, FIELD, dtype=dtype)
        if precision == "fp8":
            fp8.quantize_linears_(model, dtype, quantizes)
        fp8.cast_floating_(model, dtype)
    else:
        st = SafetensorsFile(path, FIELD, EXPECTED)
        raw = {k: v for k, v in st.meta_state_dict().items() if not fp8.is_quantized_file_key(k)}
        sd = {k.removeprefix("model."): v for k, v in raw.items() if k != "lm_head.weight"}
        if "embed_tokens.weight" not in sd or "layers.0.self_attn.q_norm.weight" not in sd:
            raise CheckpointError(f"{FIELD}: expected {EXPECTED}, found {describe_component(raw)} in {path}")
        model = build_empty(lambda: Qwen3Model(Qwen3Config(**qwen3_config_from_shapes(sd))))
        if precision == "fp8":
            fp8.replace_linears_(model, dtype, quantizes)
        key_map = {k.removeprefix("model."): k for k in raw if k != "lm_head.weight"}
        fill_from_file(model, st, key_map, dtype)
    model.requires_grad_(False)
    return model.eval()


def load_tokenizer(path: Path | str | None, which: str):
    """``which`` is ``qwen_tokenizer`` or ``t5_tokenizer``; a missing folder is one clear error saying what is
    needed and where to get it."""
    from transformers import AutoTokenizer

    field, what, source = TOKENIZER_HELP[which]
    if path is None:
        raise UserError(f"{field} is not set: anima needs {what} in a local folder; get it from {source}")
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{field}: {path} is not a folder (expected {what}; get it from {source})")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{field}: cannot load {what} from {path}: {exc}") from None


@dataclass
class TextBatch:
    """Token ids of a batch of prompts, right-padded, with masks and T5 per-token weights."""

    qwen_ids: torch.Tensor
    qwen_mask: torch.Tensor
    t5_ids: torch.Tensor
    t5_mask: torch.Tensor
    t5_weights: torch.Tensor

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(*(t.to(device) for t in (self.qwen_ids, self.qwen_mask, self.t5_ids, self.t5_mask,
                                                   self.t5_weights)))


def _pad(rows: list[list[Any]], value: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    data = torch.full((len(rows), width), value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        data[i, : len(r)] = torch.tensor(r, dtype=dtype)
        mask[i, : len(r)] = 1
    return data, mask


# Caption length limits, as sd-scripts' Anima defaults (qwen3_max_token_length / t5_max_token_length = 512): the
# LLM adapter's context is 512 T5 positions (shorter prompts are zero-padded to it), which is what Anima was trained
# on; and without a cap a 10 000-token caption costs GBs of attention memory per step.
MAX_QWEN_TOKENS = 512
MAX_T5_TOKENS = 512  # </s> included


class TextEncoder:
    """Qwen3 + both tokenizers: prompts → (Qwen hidden states, T5 ids, weights) for the LLM adapter."""

    def __init__(self, qwen: torch.nn.Module, qwen_tokenizer, t5_tokenizer) -> None:
        self.qwen = qwen
        self.qwen_tokenizer = qwen_tokenizer
        self.t5_tokenizer = t5_tokenizer
        pad = qwen_tokenizer.pad_token_id
        self.qwen_pad_id = pad if pad is not None else qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.t5_eos_id = t5_tokenizer.eos_token_id
        self.t5_pad_id = t5_tokenizer.pad_token_id or 0

    def _ids(self, tokenizer, text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]

    def tokenize(self, prompts: Sequence[str], *, truncate: bool = False) -> TextBatch:
        """Ids, masks and T5 weights of ``prompts``, full length (as ComfyUI). ``truncate=True`` (training
        captions) cuts a prompt past :data:`MAX_QWEN_TOKENS` Qwen3 tokens or :data:`MAX_T5_TOKENS` T5 tokens
        (``</s>`` included) there, keeping the start."""
        qwen_rows, t5_rows, weight_rows = [], [], []
        for prompt in prompts:
            segments = parse_weighted(prompt)
            qwen = [i for seg, _ in segments for i in self._ids(self.qwen_tokenizer, seg)]
            t5, weights = [], []
            for seg, w in segments:
                ids = self._ids(self.t5_tokenizer, seg)
                t5 += ids
                weights += [w] * len(ids)
            if truncate:
                qwen = qwen[:MAX_QWEN_TOKENS]
                t5, weights = t5[:MAX_T5_TOKENS - 1], weights[:MAX_T5_TOKENS - 1]
            qwen_rows.append(qwen or [self.qwen_pad_id])  # never a fully masked row
            t5_rows.append(t5 + [self.t5_eos_id])
            weight_rows.append(weights + [1.0])
        qwen_ids, qwen_mask = _pad(qwen_rows, self.qwen_pad_id, torch.long)
        t5_ids, t5_mask = _pad(t5_rows, self.t5_pad_id, torch.long)
        t5_weights, _ = _pad(weight_rows, 0.0, torch.float32)
        return TextBatch(qwen_ids, qwen_mask, t5_ids, t5_mask, t5_weights)

    @torch.no_grad()
    def encode_qwen(self, batch: TextBatch) -> torch.Tensor:
        device = next(self.qwen.parameters()).device
        out = self.qwen(input_ids=batch.qwen_ids.to(device), attention_mask=batch.qwen_mask.to(device),
                        use_cache=False)
        hidden = out.last_hidden_state  # after the final norm
        return hidden * batch.qwen_mask.to(device).unsqueeze(-1).to(hidden.dtype)
