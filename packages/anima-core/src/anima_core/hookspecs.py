"""The hooks a plugin may implement. Each docstring is the plugin author's documentation.

A plugin is a module named by an entry point in the ``anima_core.plugins`` group, e.g. in its pyproject::

    [project.entry-points."anima_core.plugins"]
    anima_my_plugin = "anima_my_plugin.plugin"

and implementing any of the hooks below with ``@anima_core.hookimpl``. Keep the module import-cheap: import torch
and other heavy libraries inside ``build`` functions, never at module level, because every ``anima`` command
(``anima --help`` included) imports every plugin module.

Variant names come from the specs handed to ``register``, never from entry-point names. A variant name provided by
two distributions is an error that names both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import typer

    from anima_core.specs import VariantSpec

PROJECT = "anima"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def anima_register_adapters(register: Callable[[VariantSpec], None]) -> None:
    """Register adapter variants (LoRA, LoKr, ...).

    Call ``register(VariantSpec(name=..., options=..., build=...))`` once per variant. ``options`` subclasses
    :class:`anima_core.options.AdapterOptions`; ``build(options)`` returns an object satisfying
    :class:`anima_core.protocols.AdapterProtocol`, whose docstring is the full contract. In short, the runtime calls
    ``inject(model)`` once with the DiT still on the CPU and its base already frozen (create fp32 parameters; with
    ``model.base_precision: fp8`` never rebuild or add into the base weight; key the file by
    ``model.original_module_name(path)`` so ComfyUI can load it), then ``get_param_groups(weight_decay)`` (torch
    param-group dicts), ``load(path)`` on resume (in place, after the optimizer is built), ``save(path, metadata,
    dtype=...)`` for each LoRA file and ``save(path, {})`` for each state. Optional: ``on_step_begin``,
    ``regularization_loss``, ``excludes_weight_decay`` (:class:`anima_core.protocols.AdapterHooks`) and ``merge``,
    ``unmerge``, ``set_multiplier`` (:class:`anima_core.protocols.MergeableAdapter`). A variant whose saved files
    are not plain LoRA (``lora_down``/``lora_up``/``alpha``) sets ``file_deltas`` on its spec so ``anima generate
    --lora`` can apply them; core asks every installed adapter with ``file_deltas``, the one named by the file's
    ``anima_adapter`` metadata first.
    """


@hookspec
def anima_register_optimizers(register: Callable[[VariantSpec], None]) -> None:
    """Register optimizer variants.

    ``options`` subclasses :class:`anima_core.options.OptimizerOptions` (which carries ``lr``);
    ``build(options, param_groups)`` returns a ``torch.optim.Optimizer``. Declare ``capabilities`` such as
    ``"adaptive_lr"`` (lr is a multiplier) or ``"schedule_free"`` (needs ``train()``/``eval()``; only the
    ``constant`` scheduler) and core acts on them without naming your optimizer.
    """


@hookspec
def anima_register_lr_schedulers(register: Callable[[VariantSpec], None]) -> None:
    """Register learning-rate scheduler variants.

    ``options`` subclasses :class:`anima_core.options.LRSchedulerOptions` (which carries ``warmup_steps``);
    ``build(options, optimizer, total_steps)`` returns a ``torch.optim.lr_scheduler.LRScheduler`` that core steps
    once after every optimizer step (not at all for ``schedule_free`` optimizers). **The scheduler applies
    ``warmup_steps``; core does not.** Core's schedulers warm up linearly with factor (k − 1) / warmup_steps at
    optimizer step k, so step 1 runs at lr 0 and the full lr is reached at step ``warmup_steps + 1`` (see
    :class:`anima_core.protocols.LRSchedulerBuilder`).
    """


@hookspec
def anima_register_timestep_samplers(register: Callable[[VariantSpec], None]) -> None:
    """Register training timestep samplers.

    ``options`` subclasses :class:`anima_core.options.TimestepSamplerOptions`; ``build(options,
    total_steps=total_steps)`` returns a :class:`anima_core.protocols.TimestepSamplerProtocol`. t is the
    rectified-flow time and equals the σ fed to the DiT: x_t = (1 − t)·x0 + t·ε, t = 1 is pure noise.
    ``sample(batch_size, generator=None)`` returns fp32 t of shape ``[batch_size]`` on the CPU, in the open interval
    (0, 1), drawing every random number from ``generator`` (the loop always passes one; the conformance kit checks
    the global RNG is untouched). ``record``, ``maybe_refresh``, ``status``, ``state_dict`` and ``load_state_dict``
    are optional (:class:`anima_core.protocols.TimestepSamplerHooks`).
    """


@hookspec
def anima_register_inference_samplers(register: Callable[[VariantSpec], None]) -> None:
    """Register inference samplers (used by ``anima generate`` and training previews).

    ``options`` subclasses :class:`anima_core.options.InferenceSamplerOptions`; ``build(options)`` returns a
    :class:`anima_core.protocols.InferenceSamplerProtocol` whose ``sample(denoise_fn, x, sigmas, **kw)`` integrates
    from ``sigmas[0]`` to ``sigmas[-1]``, where ``denoise_fn(x, sigma)`` returns the clean-sample estimate. Core
    passes ``generator=``, ``callback=`` and ``shift=`` as keywords; draw every random number from ``generator``.
    """


@hookspec
def anima_register_losses(register: Callable[[VariantSpec], None]) -> None:
    """Register loss variants.

    ``options`` subclasses :class:`anima_core.options.LossOptions`; ``build(options)`` returns a
    :class:`anima_core.protocols.LossProtocol` whose ``compute(pred, target, t)`` returns the per-element loss (no
    reduction; same shape as ``pred``).
    """


@hookspec
def anima_register_commands(app: typer.Typer) -> None:
    """Add CLI sub-commands to ``anima``.

    Add commands or sub-apps to the Typer ``app`` (``app.command()(fn)`` or ``app.add_typer(sub, name=...)``).
    Import heavy libraries inside the command functions so ``anima --help`` stays fast.
    """
