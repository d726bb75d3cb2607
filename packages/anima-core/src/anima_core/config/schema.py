"""Build the ``TrainingConfig`` model from the installed plugins (never from hand-edited enums).

Each plugin section is a discriminated union over the installed variants' options models, keyed by ``type``.
The generated model subclasses the static :class:`~anima_core.config.sections.TrainingConfig`, is cached per
registry and dropped by :func:`reset`.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import Field, create_model

from anima_core.config.sections import SampleSection, TrainingConfig
from anima_core.kinds import Kind
from anima_core.options import ui
from anima_core.plugin_host import Registry

# Config section path -> the kind of variant it holds.
PLUGIN_SECTIONS: dict[tuple[str, ...], Kind] = {
    ("adapter",): "adapter",
    ("optimizer",): "optimizer",
    ("lr_scheduler",): "lr_scheduler",
    ("loss",): "loss",
    ("timestep_sampler",): "timestep_sampler",
    ("sample", "sampler"): "inference_sampler",
}

# What a section holds when the config leaves it out (if that variant is installed; else the first by name).
DEFAULT_VARIANTS: dict[Kind, str] = {
    "adapter": "lora",
    "optimizer": "adamw",
    "lr_scheduler": "constant",
    "loss": "mse",
    "timestep_sampler": "logit_normal",
    "inference_sampler": "er_sde",
}

_cache: dict[Registry, type[TrainingConfig]] = {}


def default_variant(registry: Registry, kind: Kind) -> str | None:
    names = registry.names(kind)
    if not names:
        return None
    return DEFAULT_VARIANTS[kind] if DEFAULT_VARIANTS[kind] in names else names[0]


def _section(registry: Registry, kind: Kind, description: str) -> tuple[Any, Any]:
    regs = registry.registrations(kind)
    if not regs:
        # Still a valid schema; validation reports the missing kind only if the config needs it.
        return (Optional[dict[str, Any]],
                Field(None, description=f"No {kind} variant is installed.", json_schema_extra=ui(kind)))
    models = tuple(r.spec.options for r in regs)
    union = models[0] if len(models) == 1 else Union[models]  # type: ignore[valid-type]
    default_reg = registry.lookup(kind, default_variant(registry, kind) or regs[0].name) or regs[0]
    default = default_reg.spec.options
    return (Annotated[union, Field(discriminator="type")],
            Field(default_factory=default, description=description, json_schema_extra=ui(kind)))


def training_config_model(registry: Registry) -> type[TrainingConfig]:
    """The config model for this registry's variants (cached)."""
    model = _cache.get(registry)
    if model is not None:
        return model
    sample = create_model(
        "SampleSection", __base__=SampleSection, __module__=__name__,
        sampler=_section(registry, "inference_sampler", "Inference sampler for preview images."))
    model = create_model(
        "TrainingConfig", __base__=TrainingConfig, __module__=__name__,
        adapter=_section(registry, "adapter", "Adapter trained on the DiT."),
        optimizer=_section(registry, "optimizer", "Optimizer."),
        lr_scheduler=_section(registry, "lr_scheduler", "Learning-rate schedule."),
        loss=_section(registry, "loss", "Per-element training loss."),
        timestep_sampler=_section(registry, "timestep_sampler", "Training timestep distribution."),
        sample=(sample, Field(default_factory=sample, json_schema_extra=ui("sample"))),
    )
    _cache[registry] = model
    return model


def json_schema(registry: Registry) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the config for the installed plugins."""
    schema = training_config_model(registry).model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def reset() -> None:
    """Forget every generated model (after plugins were added or removed in-process)."""
    _cache.clear()
