"""Every built-in variant passes the conformance kit (and a new built-in without a class here fails)."""

from anima_core.plugin_host import make_host
from anima_core.testing import (
    AdapterConformance,
    InferenceSamplerConformance,
    LossConformance,
    LRSchedulerConformance,
    OptimizerConformance,
    TimestepSamplerConformance,
)
from anima_core.testing.distributions import entry_points_of


class TestLoRA(AdapterConformance):
    name = "lora"
    options = {"targets": [".*"], "rank": 4, "alpha": 2.0}


class TestAdamW(OptimizerConformance):
    name = "adamw"


class TestConstant(LRSchedulerConformance):
    name = "constant"
    options = {"warmup_steps": 3}


class TestCosine(LRSchedulerConformance):
    name = "cosine"
    options = {"warmup_steps": 2, "eta_min": 0.01}


class TestCosineWithRestarts(LRSchedulerConformance):
    name = "cosine_with_restarts"
    options = {"period": 4, "period_mult": 1.5}


class TestMSE(LossConformance):
    name = "mse"


class TestHuber(LossConformance):
    name = "huber"


class TestUniform(TimestepSamplerConformance):
    name = "uniform"


class TestLogitNormal(TimestepSamplerConformance):
    name = "logit_normal"
    options = {"shift": 3.0, "uniform_mix_prob": 0.2}


class TestMode(TimestepSamplerConformance):
    name = "mode"


class TestEuler(InferenceSamplerConformance):
    name = "euler"


class TestERSDE(InferenceSamplerConformance):
    name = "er_sde"


def test_every_builtin_has_a_conformance_class():
    covered = {(cls.kind, cls.name) for cls in globals().values()
               if isinstance(cls, type) and cls.__name__.startswith("Test") and hasattr(cls, "name")}
    registry = make_host(entry_points=entry_points_of("anima-core"), strict=True).registry
    builtins = {(r.kind, r.name) for kind in ("adapter", "optimizer", "lr_scheduler", "timestep_sampler",
                                               "inference_sampler", "loss") for r in registry.registrations(kind)}
    assert builtins == covered
