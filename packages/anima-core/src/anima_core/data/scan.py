"""Scanning dataset folders without loading any model: which images are usable, their repeats, captions and buckets,
and every problem found (each kind reported once, with the files it concerns)."""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from anima_core.data.buckets import Size, assign_bucket, make_buckets, needs_upscale
from anima_core.data.captions import Caption, CaptionError, parse_text_caption, read_caption_file
from anima_core.data.config import DatasetSection
from anima_core.data.images import IMAGE_EXTENSIONS, ImageError, probe_image
from anima_core.errors import UserError

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
REG_KEY_PREFIX = "reg:"
MAX_LISTED = 50  # paths listed inside one warning line; ScanReport keeps the full lists


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    key: str  # path relative to its dataset root (POSIX), "reg:"-prefixed for regularisation images
    width: int  # after EXIF orientation
    height: int
    content_hash: str
    repeats: int  # folder repeat × section repeats
    is_reg: bool
    caption: Caption
    caption_source: str  # the caption file's extension, "override", or "" when there is none
    buckets: tuple[Size, ...]  # one per dataset.resolution, same order


@dataclass
class ScanReport:
    root: Path
    reg_root: Optional[Path]
    resolutions: list[int]
    images: list[ImageRecord] = field(default_factory=list)
    reg_images: list[ImageRecord] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    malformed_captions: list[tuple[Path, str]] = field(default_factory=list)
    non_utf8_captions: list[Path] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)
    upscaled: list[tuple[Path, Size, Size]] = field(default_factory=list)  # (image, its size, bucket)
    skipped_folders: list[Path] = field(default_factory=list)  # 0_name folders
    problems: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def records(self) -> list[ImageRecord]:
        return self.images + self.reg_images

    def samples_per_epoch(self) -> int:
        return sum(r.repeats for r in self.records) * len(self.resolutions)

    def describe_problems(self, limit: Optional[int] = MAX_LISTED) -> list[str]:
        """One warning per kind of problem, listing the files (at most ``limit`` per line; None lists all)."""
        out = []

        def add(items: list, text: str, fmt=str) -> None:
            if items:
                out.append(text.format(n=len(items)) + ": " + _listing([fmt(x) for x in items], limit))

        add(self.unreadable, "skipped {n} unreadable image(s)", lambda x: f"{x[0]} ({x[1]})")
        add(self.skipped_folders, "skipped {n} folder(s) with repeat 0")
        add(self.malformed_captions, "{n} caption file(s) could not be used (the next caption extension is tried, "
                                     "else the caption is empty)", lambda x: f"{x[0]}: {x[1]}")
        add(self.missing_captions, "{n} image(s) have no usable caption file; they train with an empty caption")
        add(self.non_utf8_captions, "{n} caption file(s) are not valid UTF-8 (decoded with replacement characters)")
        add(self.empty_captions, "{n} caption file(s) are empty")
        add(self.upscaled, "{n} image(s) are smaller than their bucket and will be upscaled",
            lambda x: f"{x[0]} ({x[1][0]}x{x[1][1]} → {x[2][0]}x{x[2][1]})")
        return out

    def caption_stats(self) -> dict:
        """Caption sources, tags per caption (min/mean/max) and the most common tags, over unique images."""
        counts = [len(r.caption.all_tags()) for r in self.records]
        tags = Counter(t.lower() for r in self.records for t in r.caption.all_tags())
        return {
            "sources": dict(Counter(r.caption_source or "none" for r in self.records)),
            "tags_min": min(counts), "tags_mean": sum(counts) / len(counts), "tags_max": max(counts),
            "with_natural_language": sum(1 for r in self.records if r.caption.nl),
            "empty": sum(1 for r in self.records if r.caption.empty),
            "top_tags": tags.most_common(15),
        }

    def bucket_histogram(self) -> dict[int, Counter]:
        """Per base resolution: bucket → samples per epoch (repeats counted)."""
        hist: dict[int, Counter] = {res: Counter() for res in self.resolutions}
        for record in self.records:
            for res, bucket in zip(self.resolutions, record.buckets):
                hist[res][bucket] += record.repeats
        return hist

    def repeats_by_folder(self) -> dict[str, tuple[int, int]]:
        """Folder (relative to its root; "." is the root, "reg:" marks the regularisation set) → (images, repeats
        of each)."""
        out: dict[str, tuple[int, int]] = {}
        for record in self.records:
            rel = record.key.removeprefix(REG_KEY_PREFIX)
            folder = (REG_KEY_PREFIX if record.is_reg else "") + (rel.rsplit("/", 1)[0] if "/" in rel else ".")
            count, _ = out.get(folder, (0, 0))
            out[folder] = (count + 1, record.repeats)
        return out


def _listing(paths: list[str], limit: Optional[int]) -> str:
    if limit is None or len(paths) <= limit:
        return ", ".join(paths)
    return ", ".join(paths[:limit]) + f" … and {len(paths) - limit} more (`anima dataset inspect` lists all)"


def _check_folder(path: Optional[Path], name: str) -> Path:
    if path is None:
        raise UserError(f"{name} is not set (a folder of images)")
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{name}: folder not found: {path}")
    if not path.is_dir():
        raise UserError(f"{name}: {path} is a file; expected a folder of images")
    return path


def _walk(root: Path, report: ScanReport) -> tuple[list[tuple[Path, int]], int, list[Path]]:
    """(image path, folder repeat) in sorted order, how many other files were seen, and the folders skipped. A
    folder's repeat is that of its nearest N_name ancestor below the root (1 when none); N = 0 skips the folder."""
    found: list[tuple[Path, int]] = []
    skipped: list[Path] = []
    others = 0

    def visit(folder: Path, repeat: int) -> None:
        nonlocal others
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            report.unreadable.append((folder, f"folder not readable: {exc.strerror or exc}"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files, and our own temp files
            path = Path(entry.path)
            if entry.is_dir():
                match = REPEAT_FOLDER.match(entry.name)
                sub = int(match.group(1)) if match else repeat
                if sub == 0:
                    skipped.append(path)
                    continue
                visit(path, sub)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append((path, repeat))
            else:
                others += 1

    visit(root, 1)
    report.skipped_folders += skipped
    return found, others, skipped


def _caption_for(image: Path, extensions: list[str], report: ScanReport) -> tuple[Caption, str]:
    for ext in extensions:
        candidate = image.with_suffix(ext)
        if not candidate.is_file():
            continue
        try:
            loaded = read_caption_file(candidate)
        except CaptionError as exc:
            report.malformed_captions.append((candidate, str(exc)))
            continue  # fall back to the next extension (e.g. .txt beside a broken .json)
        except OSError as exc:
            report.malformed_captions.append((candidate, f"unreadable: {exc.strerror or exc}"))
            continue
        if loaded.non_utf8:
            report.non_utf8_captions.append(candidate)
        if loaded.caption.empty:
            report.empty_captions.append(candidate)
        return loaded.caption, ext
    report.missing_captions.append(image)
    return Caption(), ""


def _scan_folder(root: Path, name: str, *, repeats: int, is_reg: bool, override: Optional[str],
                 section: DatasetSection, report: ScanReport) -> list[ImageRecord]:
    found, others, skipped = _walk(root, report)
    if not found:
        if others == 0 and not skipped:
            raise UserError(f"{name}: folder {root} is empty (no files in it or its sub-folders)")
        exts = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        raise UserError(f"{name}: no images ({exts}) in {root} or its sub-folders"
                        + (f" ({others} other file(s))" if others else "")
                        + (f"; skipped folders with repeat 0: {', '.join(map(str, skipped))}" if skipped else ""))
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        probes = list(pool.map(_probe_or_error, [p for p, _ in found]))
    bucket_sets = [make_buckets(res, section.bucket_step, section.aspect_ratio_limit) for res in section.resolution]
    records = []
    bad_before = len(report.unreadable)
    for (path, folder_repeat), probe in zip(found, probes):
        if isinstance(probe, str):
            report.unreadable.append((path, probe))
            continue
        if override is not None:
            caption, source = parse_text_caption(override), "override"
        else:
            caption, source = _caption_for(path, section.caption_extensions, report)
        buckets = tuple(assign_bucket(probe.width, probe.height, b) for b in bucket_sets)
        for bucket in dict.fromkeys(buckets):
            if needs_upscale(probe.width, probe.height, bucket):
                report.upscaled.append((path, (probe.width, probe.height), bucket))
        rel = path.relative_to(root).as_posix()
        records.append(ImageRecord(path=path, key=(REG_KEY_PREFIX + rel) if is_reg else rel, width=probe.width,
                                   height=probe.height, content_hash=probe.content_hash,
                                   repeats=folder_repeat * repeats, is_reg=is_reg, caption=caption,
                                   caption_source=source, buckets=buckets))
    if not records:
        bad = report.unreadable[bad_before:]
        raise UserError(f"{name}: no usable images in {root}: all {len(bad)} are unreadable:\n  "
                        + "\n  ".join(f"{p}: {why}" for p, why in bad))
    return records


def _probe_or_error(path: Path):
    try:
        return probe_image(path)
    except ImageError as exc:
        return str(exc)


def scan_dataset(section: DatasetSection) -> ScanReport:
    """Scan ``dataset.path`` (and ``dataset.reg.path``): raises :class:`UserError` for a missing folder, a file
    where a folder is expected, an empty folder, or no usable image; everything else becomes a problem (a
    warning) in the report and the image is kept (or skipped when unreadable)."""
    root = _check_folder(section.path, "dataset.path")
    reg_root = _check_folder(section.reg.path, "dataset.reg.path") if section.reg is not None else None
    report = ScanReport(root=root, reg_root=reg_root, resolutions=list(section.resolution))
    report.images = _scan_folder(root, "dataset.path", repeats=section.repeats, is_reg=False, override=None,
                                 section=section, report=report)
    if section.reg is not None:
        report.reg_images = _scan_folder(reg_root, "dataset.reg.path", repeats=section.reg.repeats, is_reg=True,
                                         override=section.reg.caption, section=section, report=report)
    report.problems = report.describe_problems()
    return report
