"""ComfyUI's prompt-weight syntax, so a LoRA trained here sees captions the way ComfyUI users' prompts are read.

``(text)`` multiplies the weight by 1.1 (nesting multiplies again), ``(text:1.3)`` sets it, ``\\(`` and ``\\)``
are literal parentheses (booru tags such as ``oil painting \\(medium\\)``). The rules follow ComfyUI's
``token_weights`` / ``escape_important`` in ``comfy/sd1_clip.py``: an unbalanced ``(`` opens a group to the end.
"""

from __future__ import annotations

_ESC_CLOSE, _ESC_OPEN = "\0\1", "\0\2"


def _escape(text: str) -> str:
    return text.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)


def _unescape(text: str) -> str:
    return text.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "(")


def _split_groups(text: str) -> list[str]:
    """Top-level pieces: plain runs and whole ``( ... )`` groups."""
    pieces: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    pieces.append(current)
                current = "("
            else:
                current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current + ")")
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def _weights(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for piece in _split_groups(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner = piece[1:-1]
            w = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _weights(inner, w)
        else:
            out.append((piece, weight))
    return out


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """``[(segment, weight), ...]`` with escapes resolved; empty segments dropped."""
    return [(_unescape(seg), w) for seg, w in _weights(_escape(text), 1.0) if seg]


def plain_text(text: str) -> str:
    """The caption without weight syntax (what the text encoder reads)."""
    return "".join(seg for seg, _ in parse_weighted(text))
