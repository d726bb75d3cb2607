"""The optional text-encoder cache: each distinct caption tokenised and run through Qwen3 once, stored unpadded in
``<cache_dir>/text/<encoder id>/`` and padded per batch exactly as :meth:`TextEncoder.tokenize` pads. Only valid
when every sample's caption is the same each epoch (the config refuses shuffle/dropout with it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from anima_core import atomic

if TYPE_CHECKING:
    from anima_core.model.text_encoder import TextBatch, TextEncoder

TEXT_CACHE_VERSION = "anima-text-2"  # 2: captions cut at the text encoder's token limits


@dataclass
class CachedText:
    """What the loop would get from ``tokenize`` + ``encode_qwen`` for a batch's captions."""

    text: TextBatch
    qwen_hidden: torch.Tensor  # (B, L, hidden), zero at padding


def text_encoder_identity(encoder: TextEncoder) -> str:
    h = hashlib.sha256(TEXT_CACHE_VERSION.encode())
    h.update(json.dumps(encoder.qwen.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{len(encoder.qwen_tokenizer)}|{len(encoder.t5_tokenizer)}|{encoder.qwen_pad_id}|"
             f"{encoder.t5_eos_id}|{encoder.t5_pad_id}".encode())
    state = encoder.qwen.state_dict()
    names = sorted(state)
    for name in sorted({names[0], names[len(names) // 2], names[-1]}):  # sorted: a str set's order is per process
        flat = state[name].detach().flatten()
        h.update(name.encode())
        h.update(repr(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().tolist()).encode())
    return h.hexdigest()[:32]


class TextCache:
    def __init__(self, folder: Path, qwen_pad_id: int, t5_pad_id: int) -> None:
        self.folder = folder
        self.qwen_pad_id = qwen_pad_id
        self.t5_pad_id = t5_pad_id

    def file(self, caption: str) -> Path:
        key = hashlib.sha256(caption.encode("utf-8")).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, caption: str) -> bool:
        return self.file(caption).is_file()

    def write(self, caption: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic.write_with(self.file(caption), lambda tmp: save_file(data, str(tmp), metadata={"caption": caption}))

    def read(self, caption: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.file(caption)
        try:
            return load_file(str(path))
        except Exception as exc:
            raise RuntimeError(f"text-encoder cache entry {path} for caption {caption!r} is unreadable ({exc}); "
                               "delete it and run again") from None

    def lookup(self, captions: Sequence[str]) -> CachedText:
        from anima_core.model.text_encoder import TextBatch

        rows = [self.read(c) for c in captions]
        qwen_ids, qwen_mask = _pad([r["qwen_ids"] for r in rows], self.qwen_pad_id)
        t5_ids, t5_mask = _pad([r["t5_ids"] for r in rows], self.t5_pad_id)
        t5_weights, _ = _pad([r["t5_weights"] for r in rows], 0.0)
        width = qwen_ids.shape[1]
        first = rows[0]["qwen_hidden"]
        hidden = first.new_zeros((len(rows), width, first.shape[-1]))
        for i, r in enumerate(rows):
            hidden[i, : r["qwen_hidden"].shape[0]] = r["qwen_hidden"]
        return CachedText(TextBatch(qwen_ids, qwen_mask, t5_ids, t5_mask, t5_weights), hidden)


def _pad(rows: list[torch.Tensor], value) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[0] for r in rows)
    data = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        data[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return data, mask


def build_text_cache(captions: Iterable[str], encoder: TextEncoder, cache_dir: Path, *, batch_size: int = 8,
                     progress: bool = True) -> TextCache:
    """Encode every caption not cached yet (longest first, so a batch pads little)."""
    cache = TextCache(Path(cache_dir) / "text" / text_encoder_identity(encoder), encoder.qwen_pad_id,
                      encoder.t5_pad_id)
    todo = sorted({c for c in captions if not cache.has(c)}, key=lambda c: (-len(c), c))
    if todo:
        from anima_core.progress import progress_bar

        bar = progress_bar("caching text", len(todo)) if progress else contextlib.nullcontext(lambda: None)
        with bar as advance:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                batch = encoder.tokenize(chunk, truncate=True)
                hidden = encoder.encode_qwen(batch).cpu()
                for row, caption in enumerate(chunk):
                    nq, nt = int(batch.qwen_mask[row].sum()), int(batch.t5_mask[row].sum())
                    cache.write(caption, {"qwen_ids": batch.qwen_ids[row, :nq], "t5_ids": batch.t5_ids[row, :nt],
                                          "t5_weights": batch.t5_weights[row, :nt],
                                          "qwen_hidden": hidden[row, :nq]})
                    advance()
    return cache
