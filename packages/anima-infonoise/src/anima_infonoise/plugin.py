"""anima-infonoise's plugin module (entry point ``anima_infonoise``): registers timestep_sampler ``infonoise``.
Import-cheap: the sampler (and torch) is imported by ``build`` only."""

from __future__ import annotations

from anima_core import hookimpl
from anima_core.specs import VariantSpec, warning

from anima_infonoise.options import InfoNoiseOptions


def build(options: InfoNoiseOptions, total_steps: int | None = None):
    from anima_infonoise.sampler import InfoNoiseSampler

    return InfoNoiseSampler(options, total_steps)


def validate(options: InfoNoiseOptions, config):
    if options.explore == 0:
        yield warning("timestep_sampler.explore", "explore 0: bins the base distribution rarely visits may never "
                                                  "collect min_per_bin losses, and InfoNoise then never activates")
    scheme = config.train.loss_weighting.scheme
    if scheme != "none":
        yield warning("train.loss_weighting.scheme", f"InfoNoise already reallocates training over t; the "
                                                     f"'{scheme}' loss weighting reweights it a second time")


INFONOISE = VariantSpec(name="infonoise", options=InfoNoiseOptions, build=build, validate=validate,
                        description="InfoNoise (arXiv 2602.18647): t drawn from the entropy-rate profile learned "
                                    "from the training losses.")


@hookimpl
def anima_register_timestep_samplers(register):
    register(INFONOISE)
