"""The six kinds of plugin variant; their names appear in the CLI, the config schema and JSON output."""

from typing import Final, Literal

Kind = Literal["adapter", "optimizer", "lr_scheduler", "timestep_sampler", "inference_sampler", "loss"]

KINDS: Final[tuple[Kind, ...]] = (
    "adapter",
    "optimizer",
    "lr_scheduler",
    "timestep_sampler",
    "inference_sampler",
    "loss",
)

# The hook that registers each kind; plugin authors implement these names.
REGISTER_HOOKS: Final[dict[Kind, str]] = {
    "adapter": "anima_register_adapters",
    "optimizer": "anima_register_optimizers",
    "lr_scheduler": "anima_register_lr_schedulers",
    "timestep_sampler": "anima_register_timestep_samplers",
    "inference_sampler": "anima_register_inference_samplers",
    "loss": "anima_register_losses",
}
