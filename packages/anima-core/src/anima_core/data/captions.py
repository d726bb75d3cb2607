"""Captions: reading caption files (plain text and the tag-category JSON) and the per-epoch rules (trigger,
keep_tokens, shuffle, tag dropout, caption dropout), all driven by an explicit ``random.Random`` so a (seed, epoch,
sample) triple always gives the same caption."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional

# Tag-category JSON (the reference's format): these categories stay in this order, never shuffled or dropped ...
FIXED_CATEGORIES = ("quality", "count", "character", "series", "artist")
# ... and these are shuffled within each category and subject to tag dropout.
SHUFFLED_CATEGORIES = ("appearance", "tags", "environment")
NL_FIELD = "nl"


class CaptionError(ValueError):
    """A caption file that cannot be used (malformed JSON or an unexpected shape)."""


@dataclass(frozen=True)
class Caption:
    """A parsed caption before the per-epoch rules. Text captions fill ``tags``; JSON captions fill ``fixed``,
    ``groups`` (one tuple per shuffled category) and ``nl`` (natural language, appended after the tags)."""

    tags: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    nl: str = ""
    is_json: bool = False

    def all_tags(self) -> list[str]:
        return [*self.tags, *self.fixed, *(t for g in self.groups for t in g)]

    @property
    def empty(self) -> bool:
        return not self.all_tags() and not self.nl


def split_tags(text: str) -> tuple[str, ...]:
    """Comma-separated tags, stripped, empty ones dropped. Only commas separate (as sd-scripts' default
    caption_separator): a caption without commas is one tag, so natural-language captions are never cut into
    words. Line breaks count as commas (several lines are several tag groups)."""
    return tuple(t for t in (part.strip() for part in text.replace("\r", "\n").replace("\n", ",").split(","))
                 if t)


def parse_text_caption(text: str) -> Caption:
    return Caption(tags=split_tags(text))


def _category(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return split_tags(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(t for v in value for t in split_tags(v))
    raise CaptionError(f"field {name!r} must be a string or a list of strings, found {json.dumps(value)[:60]}")


def parse_json_caption(text: str) -> Caption:
    """Accepts the standard shape ``{"meta": {"trigger"}, "tags": {category: ...}}`` and the flat one with the
    categories at the top level (where ``"tags"`` is a list, also with ``"meta"``: the shape the reference
    misread as standard and trained as an empty caption, its bug #345). Raises :class:`CaptionError`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CaptionError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CaptionError(f"expected a JSON object, found {type(data).__name__}")
    meta = data.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise CaptionError("field 'meta' must be an object")
    cats = data["tags"] if isinstance(data.get("tags"), dict) else data
    known = (*FIXED_CATEGORIES, *SHUFFLED_CATEGORIES, NL_FIELD)
    trigger = meta.get("trigger", data.get("trigger"))
    if trigger is None and not any(k in cats for k in known) and NL_FIELD not in data:
        raise CaptionError(f"no caption fields found (expected some of: trigger, {', '.join(known)})")
    nl = cats.get(NL_FIELD, data.get(NL_FIELD))
    if nl is not None and not isinstance(nl, str):
        raise CaptionError(f"field 'nl' must be a string, found {json.dumps(nl)[:60]}")
    fixed = _category("trigger", trigger)
    fixed += tuple(t for name in FIXED_CATEGORIES for t in _category(name, cats.get(name)))
    groups = tuple(g for g in (_category(name, cats.get(name)) for name in SHUFFLED_CATEGORIES) if g)
    return Caption(fixed=fixed, groups=groups, nl=(nl or "").strip(), is_json=True)


@dataclass(frozen=True)
class CaptionFile:
    caption: Caption
    non_utf8: bool  # decoded with replacement characters


def read_caption_file(path: Path) -> CaptionFile:
    """Read and parse one caption file (``.json`` as JSON, anything else as text). Raises :class:`CaptionError`
    for a malformed JSON file and ``OSError`` when unreadable."""
    raw = path.read_bytes()
    try:
        text, non_utf8 = raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, non_utf8 = raw.decode("utf-8", errors="replace"), True
    parse = parse_json_caption if path.suffix.lower() == ".json" else parse_text_caption
    return CaptionFile(parse(text), non_utf8)


@dataclass(frozen=True)
class CaptionRules:
    trigger: Optional[str] = None
    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0

    @classmethod
    def for_section(cls, section, *, reg: bool = False) -> CaptionRules:
        rules = cls(trigger=section.trigger, shuffle=section.shuffle_caption, keep_tokens=section.keep_tokens,
                    tag_dropout=section.tag_dropout, caption_dropout=section.caption_dropout)
        # Regularisation images show the class without the subject: no trigger, and (as the reference) no tag
        # dropout, so their captions stay complete.
        return replace(rules, trigger=None, tag_dropout=0.0) if reg else rules

    @property
    def deterministic(self) -> bool:
        return not self.shuffle and self.tag_dropout == 0 and self.caption_dropout == 0


def _dedupe(tags: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for tag in tags:
        if tag.lower() not in seen:
            seen.add(tag.lower())
            out.append(tag)
    return out


def render_caption(caption: Caption, rules: CaptionRules, rng: Optional[random.Random] = None) -> str:
    """The caption text for one sample: trigger first, then the kept tags (text: the first keep_tokens; JSON: the
    fixed categories), then the rest shuffled and thinned by tag dropout (JSON: per category, in category order),
    duplicates removed case-insensitively (first kept), the natural-language part last. Draws: caption dropout,
    then shuffle, then tag dropout; a rule that is off draws nothing. ``rng`` may be None only when the rules are
    deterministic."""
    if rng is None:
        if not rules.deterministic:
            raise ValueError("random caption rules need an rng")
        rng = random.Random(0)  # never drawn from
    if rules.caption_dropout > 0 and rng.random() < rules.caption_dropout:
        return ""

    def vary(tags: tuple[str, ...]) -> list[str]:
        out = list(tags)
        if rules.shuffle:
            rng.shuffle(out)
        if rules.tag_dropout > 0:
            out = [t for t in out if rng.random() >= rules.tag_dropout]
        return out

    head = [rules.trigger] if rules.trigger else []
    if caption.is_json:
        head += caption.fixed  # keep_tokens does not apply: the fixed categories play that role
        body = [t for group in caption.groups for t in vary(group)]
    else:
        head += caption.tags[:rules.keep_tokens]
        body = vary(caption.tags[rules.keep_tokens:])
    text = ", ".join(_dedupe(head + body))
    if caption.nl:
        text = f"{text}. {caption.nl}" if text else caption.nl
    return text


def caption_file_of(record) -> str:
    """Where an image record's caption came from, for messages: its caption file, or the config field."""
    source = record.caption_source
    if source == "override":
        return f"dataset.reg.caption (for {record.path})"
    return str(record.path.with_suffix(source)) if source else str(record.path)


def long_caption_warning(captions: Iterable[tuple[str, str]], encoder, limit: Optional[int] = 50) -> Optional[str]:
    """One warning naming the caption files (``(file, longest rendered caption)`` pairs) that the text encoder
    cuts at its token limits (:data:`anima_core.model.text_encoder.MAX_QWEN_TOKENS` / ``MAX_T5_TOKENS``), or None.
    Counted as :meth:`TextEncoder.tokenize` counts (weight syntax parsed, ``</s>`` included)."""
    from anima_core.model.text_encoder import MAX_QWEN_TOKENS, MAX_T5_TOKENS

    long = []
    for source, text in captions:
        batch = encoder.tokenize([text], truncate=False)
        qwen, t5 = int(batch.qwen_mask.sum()), int(batch.t5_mask.sum())
        if qwen > MAX_QWEN_TOKENS or t5 > MAX_T5_TOKENS:
            long.append(f"{source} ({t5} T5 / {qwen} Qwen3 tokens)")
    if not long:
        return None
    listed = ", ".join(long[:limit]) + (f" … and {len(long) - limit} more" if limit and len(long) > limit else "")
    return (f"{len(long)} caption(s) are longer than training reads ({MAX_T5_TOKENS} T5 / {MAX_QWEN_TOKENS} "
            f"Qwen3 tokens, as sd-scripts) and are cut there, so their end is never trained: {listed}")
