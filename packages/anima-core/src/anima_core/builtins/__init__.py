"""anima-core's built-in variants, registered through core's own entry point like any third-party plugin."""

from anima_core import hookimpl
from anima_core.builtins import adapters, inference, losses, optimizers, schedulers, timesteps


@hookimpl
def anima_register_adapters(register):
    register(adapters.LORA)


@hookimpl
def anima_register_optimizers(register):
    register(optimizers.ADAMW)


@hookimpl
def anima_register_lr_schedulers(register):
    register(schedulers.CONSTANT)
    register(schedulers.COSINE)
    register(schedulers.COSINE_WITH_RESTARTS)


@hookimpl
def anima_register_timestep_samplers(register):
    register(timesteps.UNIFORM)
    register(timesteps.LOGIT_NORMAL)
    register(timesteps.MODE)


@hookimpl
def anima_register_inference_samplers(register):
    register(inference.EULER)
    register(inference.ER_SDE)


@hookimpl
def anima_register_losses(register):
    register(losses.MSE)
    register(losses.HUBER)
