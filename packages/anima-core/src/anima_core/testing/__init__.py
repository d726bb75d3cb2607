"""Test kit for anima and its plugins: conformance base classes per variant kind.

A plugin opts in with one small class per variant in its own tests::

    from anima_core.testing import OptimizerConformance

    class TestProdigy(OptimizerConformance):
        name = "prodigy"
        options = {"d_coef": 1.0}

This module imports pytest and torch; import it from tests only.
"""

from anima_core.testing.conformance import (
    AdapterConformance,
    InferenceSamplerConformance,
    LossConformance,
    LRSchedulerConformance,
    OptimizerConformance,
    TimestepSamplerConformance,
    VariantConformance,
    installed_registry,
)

__all__ = [
    "AdapterConformance",
    "InferenceSamplerConformance",
    "LRSchedulerConformance",
    "LossConformance",
    "OptimizerConformance",
    "TimestepSamplerConformance",
    "VariantConformance",
    "installed_registry",
]
