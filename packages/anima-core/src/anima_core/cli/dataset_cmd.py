"""``anima dataset ...``"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Look at a dataset the way training will see it.", no_args_is_help=True)


def _section(path: Path, config: Optional[Path], resolution: list[int], reg: Optional[Path],
             aspect_ratio_limit: Optional[float], bucket_step: Optional[int]):
    """The ``dataset`` section of ``config`` (if given) with the command-line values on top."""
    import yaml
    from pydantic import ValidationError

    from anima_core.data.config import DatasetSection
    from anima_core.errors import UserError

    values: dict = {}
    batch_size = 1
    if config is not None:
        try:
            raw = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"{config}: cannot read the config: {exc}") from None
        values = dict(raw.get("dataset") or {}) if isinstance(raw, dict) else {}
        train = raw.get("train") if isinstance(raw, dict) else None
        if isinstance(train, dict) and isinstance(train.get("batch_size"), int):
            batch_size = train["batch_size"]
    values["path"] = path
    if resolution:
        values["resolution"] = resolution
    if reg is not None:
        values["reg"] = {**(values.get("reg") or {}), "path": reg}
    if aspect_ratio_limit is not None:
        values["aspect_ratio_limit"] = aspect_ratio_limit
    if bucket_step is not None:
        values["bucket_step"] = bucket_step
    try:
        return DatasetSection(**values), batch_size
    except ValidationError as exc:
        lines = [f"dataset.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise UserError("invalid dataset settings:\n  " + "\n  ".join(lines)) from None


@app.command("inspect")
def inspect(path: Path = typer.Argument(..., help="Dataset folder."),
            config: Optional[Path] = typer.Option(None, "--config", "-c",
                                                  help="Take the other dataset settings (and train.batch_size) "
                                                       "from this training config."),
            resolution: List[int] = typer.Option([], "--resolution", "-r", help="Base resolution (repeatable)."),
            reg: Optional[Path] = typer.Option(None, "--reg", help="Regularisation image folder."),
            aspect_ratio_limit: Optional[float] = typer.Option(None, help="Most elongated bucket allowed."),
            bucket_step: Optional[int] = typer.Option(None, help="Bucket sides are multiples of this."),
            batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1,
                                                     help="Count batches per epoch for this batch size.")) -> None:
    """Image count, repeats, the bucket histogram, caption stats and every problem found (no model is loaded)."""
    from anima_core.data.buckets import make_buckets
    from anima_core.data.sampler import bucket_batches
    from anima_core.data.scan import scan_dataset

    section, config_batch = _section(path, config, resolution, reg, aspect_ratio_limit, bucket_step)
    batch_size = batch_size or config_batch
    report = scan_dataset(section)
    echo = typer.echo
    skipped = f", {len(report.unreadable)} skipped" if report.unreadable else ""
    echo(f"dataset: {report.root}: {len(report.images)} usable image(s){skipped}")
    if section.reg is not None:
        override = f", caption {section.reg.caption!r}" if section.reg.caption is not None else ""
        echo(f"regularisation: {report.reg_root}: {len(report.reg_images)} image(s), loss weight "
             f"{section.reg.loss_weight}{override}")
    echo("\nrepeats (folder: images × repeats):")
    for folder, (count, repeats) in sorted(report.repeats_by_folder().items()):
        echo(f"  {folder}: {count} × {repeats}")
    buckets = [b for record in report.records for b in record.buckets for _ in range(record.repeats)]
    echo(f"samples per epoch: {report.samples_per_epoch()} ({len(section.resolution)} resolution(s)); batches per "
         f"epoch at batch size {batch_size}: {bucket_batches(buckets, batch_size)}")
    for res, hist in report.bucket_histogram().items():
        available = make_buckets(res, section.bucket_step, section.aspect_ratio_limit)
        echo(f"\nbuckets at {res} ({len(hist)} used of {len(available)}; step {section.bucket_step}, aspect ratio "
             f"≤ {section.aspect_ratio_limit:g}):")
        top = max(hist.values())
        for (w, h), n in sorted(hist.items(), key=lambda kv: kv[0][0] / kv[0][1]):
            bar = "█" * max(1, round(30 * n / top))
            echo(f"  {w:>5}x{h:<5} {w / h:5.2f}  {n:>6}  {bar}")
    stats = report.caption_stats()
    echo("\ncaptions:")
    echo("  sources: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["sources"].items())))
    echo(f"  tags per caption: min {stats['tags_min']}, mean {stats['tags_mean']:.1f}, max {stats['tags_max']}; "
         f"with natural language: {stats['with_natural_language']}; empty: {stats['empty']}")
    if stats["top_tags"]:
        echo("  most common tags: " + ", ".join(f"{t} ({n})" for t, n in stats["top_tags"]))
    problems = report.describe_problems(limit=None)
    echo(f"\nproblems: {len(problems) or 'none'}")
    for line in problems:
        echo(f"  - {line}")
