"""In-process plugins used by the plugin-host and config tests."""

from typing import Literal

from anima_core import hookimpl
from anima_core.options import AdapterOptions, OptimizerOptions, field
from anima_core.specs import VariantSpec, error


class LionLikeOptions(OptimizerOptions):
    type: Literal["fake_lion"] = "fake_lion"
    beta: float = field(0.95, "Momentum.", ge=0, lt=1)


def _build_sgd(options, param_groups):
    import torch

    return torch.optim.SGD(param_groups, lr=options.lr)


def _refuse_big_lr(options, config):
    if options.lr > 0.5:
        yield error("optimizer.lr", f"fake_lion diverges above 0.5 (found {options.lr})")


class FakeOptimizerPlugin:
    @hookimpl
    def anima_register_optimizers(self, register):
        register(VariantSpec(name="fake_lion", options=LionLikeOptions, build=_build_sgd, validate=_refuse_big_lr,
                             description="A fake optimizer for tests."))


class ScheduleFreeOptions(OptimizerOptions):
    type: Literal["fake_sf"] = "fake_sf"


class AdaptiveOptions(OptimizerOptions):
    type: Literal["fake_adaptive"] = "fake_adaptive"


class CapabilityPlugin:
    @hookimpl
    def anima_register_optimizers(self, register):
        register(VariantSpec(name="fake_sf", options=ScheduleFreeOptions, build=_build_sgd,
                             capabilities=frozenset({"schedule_free"}), description="schedule-free fake"))
        register(VariantSpec(name="fake_adaptive", options=AdaptiveOptions, build=_build_sgd,
                             capabilities=frozenset({"adaptive_lr"}), description="adaptive fake"))


class AdamWOptionsAgain(OptimizerOptions):
    type: Literal["adamw"] = "adamw"


class DuplicateAdamWPlugin:
    @hookimpl
    def anima_register_optimizers(self, register):
        register(VariantSpec(name="adamw", options=AdamWOptionsAgain, build=_build_sgd, description="clash"))


class RaisingRegisterPlugin:
    @hookimpl
    def anima_register_losses(self, register):
        raise RuntimeError("cannot register today")


class WrongLiteralPlugin:
    @hookimpl
    def anima_register_optimizers(self, register):
        register(VariantSpec(name="not_the_literal", options=LionLikeOptions, build=_build_sgd, description="x"))


class UnknownHookPlugin:
    @hookimpl
    def anima_register_widgets(self, register):
        pass


class CommandPlugin:
    @hookimpl
    def anima_register_commands(self, app):
        @app.command("hello-plugin")
        def hello() -> None:
            """Say hello from a plugin."""
            print("hello from a plugin command")


class FakeDeltaOptions(AdapterOptions):
    type: Literal["fake_delta"] = "fake_delta"


class FakeDoubleOptions(AdapterOptions):
    type: Literal["fake_double"] = "fake_double"


def _stored_deltas(tensors, weights, factor):
    """Files keyed ``<original path>.fake_delta`` hold ΔW whole; anything else is not this format (None)."""
    found = {k[: -len(".fake_delta")]: v for k, v in tensors.items() if k.endswith(".fake_delta")}
    if not found:
        return None
    return {path: factor * delta for path, delta in found.items() if path in weights}


class FileDeltaAdapterPlugin:
    """Two adapters that read the same made-up file format (``fake_double`` doubles it), for ``--lora``."""

    @hookimpl
    def anima_register_adapters(self, register):
        register(VariantSpec(name="fake_delta", options=FakeDeltaOptions, build=lambda options: None,
                             file_deltas=lambda tensors, meta, weights: _stored_deltas(tensors, weights, 1.0),
                             description="reads .fake_delta files"))
        register(VariantSpec(name="fake_double", options=FakeDoubleOptions, build=lambda options: None,
                             file_deltas=lambda tensors, meta, weights: _stored_deltas(tensors, weights, 2.0),
                             description="reads .fake_delta files, doubled"))
