"""The runtime interfaces variants satisfy (``typing.Protocol``: structural, no base class to inherit).

Optional hooks are listed in separate protocols; the runtime calls them only when an object has them
(:func:`call_optional`), so a variant implements just what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class StepContext:
    """What the loop tells adapter hooks about the current micro-batch."""

    global_step: int
    total_steps: Optional[int]
    epoch: int
    sigma_t: "torch.Tensor"  # the batch's t (= σ fed to the DiT), shape [B]
    config: Any


@runtime_checkable
class AdapterProtocol(Protocol):
    def inject(self, model: "nn.Module") -> None: ...

    def get_param_groups(self, weight_decay: float) -> list[dict]: ...

    def save(self, path: Path | str, metadata: Mapping[str, str] | None = None) -> None: ...

    def load(self, path: Path | str) -> None: ...


class AdapterHooks(Protocol):
    """Optional adapter hooks, called by the loop when present."""

    def on_step_begin(self, ctx: StepContext) -> None: ...

    def regularization_loss(self, ctx: StepContext) -> Optional["torch.Tensor"]: ...

    def excludes_weight_decay(self, name: str) -> bool: ...


@runtime_checkable
class TimestepSamplerProtocol(Protocol):
    def sample(self, batch_size: int, generator: Optional["torch.Generator"] = None) -> "torch.Tensor": ...


class TimestepSamplerHooks(Protocol):
    """Optional: adaptive samplers learn from the raw per-sample MSE and refresh after optimizer steps."""

    def record(self, t: "torch.Tensor", raw_mse: "torch.Tensor") -> None: ...

    def maybe_refresh(self, global_step: int) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class LossProtocol(Protocol):
    def compute(self, pred: "torch.Tensor", target: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor": ...


@runtime_checkable
class InferenceSamplerProtocol(Protocol):
    def sample(self, denoise_fn: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"], x: "torch.Tensor",
               sigmas: "torch.Tensor", **kw: Any) -> "torch.Tensor": ...


class OptimizerBuilder(Protocol):
    def __call__(self, options: Any, param_groups: list[dict]) -> "torch.optim.Optimizer": ...


class LRSchedulerBuilder(Protocol):
    def __call__(self, options: Any, optimizer: "torch.optim.Optimizer",
                 total_steps: int) -> "torch.optim.lr_scheduler.LRScheduler": ...


def call_optional(obj: object, hook: str, *args: Any, default: Any = None, **kwargs: Any) -> Any:
    """Call ``obj.hook(...)`` if the object implements it, else return ``default``."""
    fn = getattr(obj, hook, None)
    return default if fn is None else fn(*args, **kwargs)
