"""Progress and logs of a run (rank 0 only): a Rich progress line on a terminal, plain log lines otherwise,
``monitor_state.json`` for front ends (atomic), a loss-curve PNG, TensorBoard scalars when installed, optional
W&B. Non-finite values are never logged."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from anima_core import atomic

HISTORY_CAP = 50_000


def ascii_curve(values: list[float], width: int = 72, height: int = 10) -> str:
    """A terminal loss curve (column means when there are more values than columns)."""
    if not values:
        return "(no loss recorded)"
    if len(values) > width:
        per = len(values) / width
        values = [sum(values[int(i * per):max(int((i + 1) * per), int(i * per) + 1)]) /
                  len(values[int(i * per):max(int((i + 1) * per), int(i * per) + 1)]) for i in range(width)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1e-8
    grid = [[" "] * len(values) for _ in range(height)]
    for x, v in enumerate(values):
        grid[height - 1 - int((v - lo) / span * (height - 1))][x] = "*"
    return "\n".join("".join(row) for row in grid) + f"\nmin={lo:.4g} max={hi:.4g}"


def write_loss_curve_png(path: Path, steps: list[int], losses: list[float], title: str = "training loss") -> None:
    """A small line plot with PIL (no matplotlib needed): raw loss in grey, its EMA in blue."""
    from PIL import Image, ImageDraw

    w, h, pad = 720, 360, 48
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
    draw.text((pad, 4), title, fill="black")
    if losses:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1e-8
        first, last = steps[0], max(steps[-1], steps[0] + 1)

        def xy(s: int, v: float) -> tuple[float, float]:
            return (pad + (s - first) / (last - first) * (w - 1.5 * pad),
                    h - pad - (v - lo) / span * (h - 1.5 * pad))

        ema, smooth = 0.0, []
        for n, v in enumerate(losses, 1):
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema / (1 - 0.9 ** n))  # bias-corrected, so short runs are not dragged to the start
        if len(losses) > 1:
            draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(190, 190, 190), width=1)
            draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 80, 200), width=2)
        draw.text((4, pad // 2), f"{hi:.4g}", fill="black")
        draw.text((4, h - pad - 10), f"{lo:.4g}", fill="black")
        draw.text((pad, h - pad + 8), f"step {first}", fill="black")
        draw.text((w - 3 * pad, h - pad + 8), f"step {steps[-1]}", fill="black")
    atomic.write_with(path, lambda tmp: img.save(tmp, format="PNG"))


class Monitor:
    """Notes print from the start; files (``monitor_state.json``, the curve, TensorBoard, W&B) are opened only by
    :meth:`start`, once the run is known to start: a run that fails before it leaves the folder as it was."""

    def __init__(self, output_dir: Path, *, enabled: bool, log_every: int, tensorboard: bool,
                 wandb_project: Optional[str], run_config: dict[str, Any]) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self.log_every = log_every
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "total_steps": None, "total_epochs": None,
                                      "losses": [], "lr_history": [], "metrics": [], "samples": [],
                                      "start_time": time.time(), "speed": None, "config": run_config,
                                      "skipped_nonfinite": 0, "skipped_steps": 0}
        self.loss_ema: Optional[float] = None
        self._last_time: Optional[float] = None
        self._speed: Optional[float] = None
        self._progress = None
        self._task = None
        self._tb = None
        self._wandb = None
        self._tensorboard = tensorboard
        self._wandb_project = wandb_project
        self._started = False

    def _open_loggers(self) -> None:
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: optional
                self._tb = None
        project = self._wandb_project or os.environ.get("WANDB_PROJECT")
        if project:
            try:
                import wandb

                self._wandb = wandb.init(project=project, config=self.state["config"], dir=str(self.output_dir))
            except Exception as exc:
                print(f"warning: W&B disabled ({exc})", file=sys.stderr)

    def _continue_from(self, first_step: int) -> None:
        """A resumed run continues the history in ``monitor_state.json`` (cut back to the resumed step, whose
        later steps are trained again) instead of starting an empty one over it."""
        try:
            old = json.loads((self.output_dir / "monitor_state.json").read_text())
        except (OSError, ValueError):
            return
        if not isinstance(old, dict):
            return
        for key in ("losses", "lr_history", "metrics", "samples"):
            entries = old.get(key)
            if isinstance(entries, list):
                self.state[key] = [e for e in entries if isinstance(e, dict) and e.get("step", 0) <= first_step]
        if isinstance(old.get("start_time"), (int, float)):
            self.state["start_time"] = old["start_time"]
        resumes = old.get("resumed") if isinstance(old.get("resumed"), list) else []
        self.state["resumed"] = [*resumes, {"step": first_step, "time": time.time()}]
        if self.state["losses"]:
            self.loss_ema = self.state["losses"][-1].get("loss")

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, total_steps: int, total_epochs: int, first_step: int, *, resumed: bool = False) -> None:
        """The run starts: open the files and loggers (rank 0). ``resumed``: append to the earlier history."""
        self.state.update(total_steps=total_steps, total_epochs=total_epochs, step=first_step)
        if not self.enabled:
            return
        self._started = True
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resumed:
            self._continue_from(first_step)
        self._open_loggers()
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=first_step, info="")
        self._write_state()

    def close(self) -> None:
        if not self.enabled or not self._started:
            return
        if self._progress is not None:
            self._progress.stop()
        print(f"skipped (non-finite): {self.state['skipped_nonfinite']} micro-batch(es) with a non-finite loss, "
              f"{self.state['skipped_steps']} optimizer step(s) with non-finite gradients", file=sys.stderr)
        losses = [e["loss"] for e in self.state["losses"]]
        if losses:
            print(ascii_curve(losses), file=sys.stderr)
            self._write_curve()
        self._write_state()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    # -- events --------------------------------------------------------------------------------------------
    def log_step(self, step: int, epoch: int, loss: float, lr: float, extra: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._last_time is not None:
            dt = now - self._last_time
            self._speed = 1 / dt if self._speed is None else 0.9 * self._speed + 0.1 / dt
        self._last_time = now
        finite = math.isfinite(loss)
        if finite:
            self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
            self._append("losses", {"step": step, "loss": loss, "time": time.time()})
        self._append("lr_history", {"step": step, "lr": lr})
        clean = {k: v for k, v in extra.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if clean:
            self._append("metrics", {"step": step, **clean})
        self.state.update(step=step, epoch=epoch, speed=self._speed)
        info = ((f"loss {self.loss_ema:.4f}" if self.loss_ema is not None else "loss nan") + f" lr {lr:.3g}"
                + (f" d {clean['optimizer/d']:.3g} eff_lr {clean['optimizer/effective_lr']:.3g}"
                   if "optimizer/d" in clean else "")
                + f" epoch {epoch + 1}" + (f" {self._speed:.2f} it/s" if self._speed else "")
                + (f" skipped {self.state['skipped_nonfinite']} batch(es) {self.state['skipped_steps']} step(s)"
                   if self.state["skipped_nonfinite"] or self.state["skipped_steps"] else ""))
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif step % self.log_every == 0 or step == self.state["total_steps"]:
            print(f"step {step}/{self.state['total_steps']} {info}", file=sys.stderr, flush=True)
        scalars = {"train/loss": loss, "train/lr": lr, **{f"train/{k}": v for k, v in clean.items()}}
        if self._tb is not None:
            for key, value in scalars.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)
        if step % self.log_every == 0:
            self._write_state()
        if step % (10 * self.log_every) == 0:  # the PNG costs ms to draw: less often than the JSON, and at close
            self._write_curve()

    def count_skips(self, micro_batches: int, steps: int) -> None:
        """This run's skipped micro-batches (non-finite loss) and optimizer steps (non-finite gradients)."""
        self.state.update(skipped_nonfinite=micro_batches, skipped_steps=steps)

    def log_samples(self, paths: list[Path], step: int) -> None:
        if not self.enabled:
            return
        for path in paths:
            self._append("samples", {"path": str(path), "step": step, "time": time.time()}, cap=50)
        self._write_state()

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)

    # -- files ---------------------------------------------------------------------------------------------
    def _append(self, key: str, entry: dict[str, Any], cap: int = HISTORY_CAP) -> None:
        items = self.state[key]
        items.append(entry)
        if len(items) > cap:
            del items[: len(items) - cap]

    def _write_state(self) -> None:
        if self.enabled and self._started:
            atomic.write_text(self.output_dir / "monitor_state.json", json.dumps(self.state, default=str))

    def _write_curve(self) -> None:
        losses = self.state["losses"]
        if losses and self.enabled and self._started:
            write_loss_curve_png(self.output_dir / "loss_curve.png", [e["step"] for e in losses],
                                 [e["loss"] for e in losses])
