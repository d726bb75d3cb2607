"""Pydantic bases for config sections and variant options, with the UI metadata every field carries.

Every field's JSON schema holds ``group`` (the form section it belongs to) and ``advanced`` (hide by default), and
where needed ``show_when`` (an expression such as ``"noise.type==offset"`` over sibling fields). A front end can
render a whole form from ``anima config schema`` alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


def ui(group: str | None = None, *, advanced: bool = False, show_when: str | None = None) -> dict[str, Any]:
    """UI metadata for ``Field(json_schema_extra=...)``; ``group`` defaults to the model's ``ui_group``."""
    extra: dict[str, Any] = {"advanced": advanced}
    if group is not None:
        extra["group"] = group
    if show_when is not None:
        extra["show_when"] = show_when
    return extra


def field(default: Any = ..., description: str = "", *, group: str | None = None, advanced: bool = False,
          show_when: str | None = None, **constraints: Any) -> Any:
    """A pydantic ``Field`` with a description and UI metadata in one call."""
    return Field(default, description=description,
                 json_schema_extra=ui(group, advanced=advanced, show_when=show_when), **constraints)


def _fill_ui_defaults(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    group = getattr(cls, "ui_group", None)
    for prop in schema.get("properties", {}).values():
        prop.setdefault("advanced", False)
        if group is not None:
            prop.setdefault("group", group)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_fill_ui_defaults, validate_default=True)
    ui_group: ClassVar[str | None] = None


class VariantOptions(StrictModel):
    """Options of one plugin variant. Subclasses declare ``type: Literal["<variant name>"] = "<variant name>"``."""

    type: str


class AdapterOptions(VariantOptions):
    ui_group = "adapter"


class OptimizerOptions(VariantOptions):
    ui_group = "optimizer"
    lr: float = field(1e-4, "Learning rate (a multiplier for adaptive-lr optimizers).", gt=0)
    weight_decay: float = field(0.0, "Weight decay.", ge=0)


class LRSchedulerOptions(VariantOptions):
    ui_group = "lr_scheduler"
    warmup_steps: int = field(0, "Linear warm-up from 0 over this many optimizer steps.", ge=0)


class TimestepSamplerOptions(VariantOptions):
    ui_group = "timestep_sampler"


class InferenceSamplerOptions(VariantOptions):
    ui_group = "sample"


class LossOptions(VariantOptions):
    ui_group = "loss"


OPTIONS_BASE: dict[str, type[VariantOptions]] = {
    "adapter": AdapterOptions,
    "optimizer": OptimizerOptions,
    "lr_scheduler": LRSchedulerOptions,
    "timestep_sampler": TimestepSamplerOptions,
    "inference_sampler": InferenceSamplerOptions,
    "loss": LossOptions,
}
