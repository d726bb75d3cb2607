"""``train(config)``: the whole run from Python, as ``anima train`` runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from anima_core.config.sections import TrainingConfig


@dataclass
class TrainResult:
    output_dir: Path
    lora: Optional[Path]  # the final (or, when interrupted, the interrupt-time) LoRA file
    state: Optional[Path]  # the newest full state folder (for --resume)
    steps: int
    interrupted: bool
    skipped_nonfinite: int = 0  # micro-batches whose loss was not finite (their backward was skipped)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a SIGINT/SIGTERM stop once state and LoRA are saved; carries the result."""

    def __init__(self, result: TrainResult) -> None:
        super().__init__(f"training interrupted at step {result.steps}; state saved in {result.state}")
        self.result = result


def resolve_config(config: TrainingConfig | dict[str, Any] | str | Path, overrides: Iterable[str] = (),
                   registry=None):
    from anima_core.config.loading import apply_overrides, load_config, validate_config
    from anima_core.plugin_host import get_host

    registry = registry or get_host().registry
    if isinstance(config, (str, Path)):
        loaded = load_config(config, overrides, registry)
    elif isinstance(config, dict):
        loaded = validate_config(apply_overrides(config, overrides), registry)
    else:
        loaded = validate_config(apply_overrides(config.model_dump(mode="json"), overrides), registry)
    return loaded, registry


def _forget_accelerator_settings() -> None:
    # accelerate keeps mixed-precision settings in a process-wide singleton; a second train() call in the same
    # process (a notebook, the test suite) may use other settings. The process group itself is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def train(config: TrainingConfig | dict[str, Any] | str | Path, *, overrides: Iterable[str] = (),
          resume: str | Path | None = None, registry=None) -> TrainResult:
    """Train an adapter. ``config``: a YAML path, a mapping or a config object; ``resume``: ``"auto"`` or a state
    folder. Returns where the outputs went; raises :class:`TrainingInterrupted` after a signal-triggered stop,
    :class:`anima_core.data.CachingInterrupted` after one during latent caching (before any step: nothing is
    written but the cache entries made so far), and ``TrainingDiverged`` (``training.phases.loop``) when the
    weights turn NaN/inf or every step is skipped (nothing is saved from such weights)."""
    from anima_core.training.context import TrainingContext
    from anima_core.training.phases import ORDER, finalize

    loaded, registry = resolve_config(config, overrides, registry)
    ctx = TrainingContext(config=loaded.config, registry=registry,
                          resume_request=None if resume is None else str(resume))
    try:
        for phase in ORDER[:-1]:
            phase.run(ctx)
    except BaseException as exc:
        from anima_core.data.cache import CachingInterrupted

        if ctx.bootstrap is not None:
            if isinstance(exc, CachingInterrupted):  # Ctrl-C before the first step: say what was kept
                ctx.bootstrap.monitor.note(str(exc))
            ctx.bootstrap.monitor.close()
            ctx.bootstrap.stop.restore()
        _forget_accelerator_settings()
        raise
    finalize.run(ctx)
    _forget_accelerator_settings()
    boot, prog = ctx.bootstrap, ctx.progress
    result = TrainResult(output_dir=boot.output_dir, lora=prog.last_lora, state=prog.last_state,
                         steps=prog.global_step, interrupted=ctx.interrupted,
                         skipped_nonfinite=prog.skipped_nonfinite)
    if ctx.interrupted:
        raise TrainingInterrupted(result)
    return result
