"""The runtime interfaces variants satisfy (``typing.Protocol``: structural, no base class to inherit).

Every signature here is the call the runtime makes, argument for argument (``tests/test_protocol_contract.py`` and
the conformance kit in :mod:`anima_core.testing` pin that). Optional hooks are listed in separate protocols; the
runtime calls them only when an object has them (:func:`call_optional`), so a variant implements just what it needs.
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

    global_step: int  # optimizer steps done so far (0 during the first step)
    total_steps: Optional[int]  # the run's optimizer steps
    epoch: int
    sigma_t: "torch.Tensor"  # the batch's t (= σ fed to the DiT), shape [B], fp32 on the training device
    config: Any  # the validated run config (anima_core.config.sections.TrainingConfig)


@runtime_checkable
class AdapterProtocol(Protocol):
    """What ``build(options)`` of an adapter variant returns. The runtime's calls, in order:

    1. **``inject(model)``** once, right after the model set is loaded. ``model`` is the
       :class:`anima_core.model.dit.AnimaDiT` (an ``nn.Module``: ``model.transformer`` is the diffusers DiT,
       ``model.text_conditioner`` the LLM adapter), **still on the CPU**; it is moved to the training device after
       ``inject`` returns, with the adapter's parameters (see ``network`` below). **Core has already frozen the
       base** (every base parameter has ``requires_grad=False``); the adapter must not unfreeze it. Create your
       parameters in **fp32** whatever the model dtype (bf16 weights lose small optimizer updates; autocast runs the
       matmuls in the compute dtype). With ``model.base_precision: fp8`` the targeted ``nn.Linear`` modules hold a
       ``float8_e4m3fn`` weight with a per-tensor scale (:class:`anima_core.model.fp8.ScaledFp8Linear`): do not
       rebuild or add into ``weight`` during training; compute ``base(x) + Δ(x)`` instead, and read the weight, if
       you must, through :func:`anima_core.model.lora_files.plain_weight`. Name each module in your file by
       **``model.original_module_name(path)``** (``path`` is the dotted ``named_modules()`` path, e.g.
       ``transformer.transformer_blocks.0.attn1.to_q``): it returns the module's name in the original Anima
       checkpoint (``blocks.0.self_attn.q_proj``; ``llm_adapter.…`` for the LLM adapter) and raises ``KeyError``
       for a module outside the DiT and the LLM adapter. ComfyUI, sd-scripts and ``anima generate --lora`` match
       LoRA keys against those original names (``lora_unet_`` + name with ``.`` → ``_``), so a file keyed by
       diffusers paths loads nowhere. Use ``getattr(model, "original_module_name", None)`` if your adapter also
       runs on models without it (the conformance kit's tiny net has none).
    2. **``get_param_groups(weight_decay)``** once, after ``inject``, positionally, with
       ``optimizer.weight_decay``. Returns ``torch.optim`` param-group dicts: ``"params"`` (a list of the trainable
       tensors; every one ``requires_grad``) plus any per-group option the optimizer takes, usually
       ``"weight_decay"`` and optionally ``"lr"`` (an absolute lr for that group; the optimizer's ``lr`` fills the
       rest). The optimizer is built from these groups before any ``load``; return the same tensor objects every
       call. Core splits off a weight-decay-free group for parameters ``excludes_weight_decay`` names.
    3. **``load(path)``** only when resuming (``anima train --resume``), after the optimizer is built and before
       its state is restored, with the ``adapter.safetensors`` file that ``save(path, {})`` wrote into the state
       folder. Copy the values **into the existing parameters** (``param.copy_(...)`` under ``torch.no_grad()``),
       never replace them: the optimizer holds those tensors. Raise on a file that does not match.
    4. **``save(path, metadata, dtype=dtype)``** for every LoRA file (``dtype`` is ``output.save_dtype`` as a
       ``torch.dtype``; ``metadata`` holds core's kohya ``ss_*``/``modelspec.*`` keys and ``anima_adapter``) and
       **``save(path, {})``** (no ``dtype``: your own full precision) for each resumable state. Write a safetensors
       file at ``path`` (a temporary path core renames), with ``metadata`` merged into the file's metadata (your
       own keys may be added; the given ones win). Cast floating tensors to ``dtype`` when it is given, except
       scalars such as ``alpha`` (keep those fp32: ComfyUI computes the scale from ``alpha.item()``). Core checks
       the written file (no NaN/inf) before it replaces the previous one. An adapter whose ``save`` takes no
       ``dtype`` (the signature documented earlier) still works: core calls ``save(path, metadata)`` and warns
       once when the file is not in ``output.save_dtype``.

    Optional attributes and hooks: ``network`` (an ``nn.Module`` holding all the adapter's modules: core moves it
    to the device and lists its ``named_parameters()`` for ``excludes_weight_decay``; without one the parameters of
    ``get_param_groups(0.0)`` are moved) and the methods of :class:`AdapterHooks` and :class:`MergeableAdapter`.
    """

    def inject(self, model: "nn.Module") -> None: ...

    def get_param_groups(self, weight_decay: float) -> list[dict]: ...

    def save(self, path: Path | str, metadata: Mapping[str, str] | None = None, *,
             dtype: Optional["torch.dtype"] = None) -> None: ...

    def load(self, path: Path | str) -> None: ...


class AdapterHooks(Protocol):
    """Optional adapter hooks, called by the training loop when present."""

    def on_step_begin(self, ctx: StepContext) -> None:
        """Before each micro-batch's forward (after its t is drawn)."""

    def regularization_loss(self, ctx: StepContext) -> Optional["torch.Tensor"]:
        """A scalar added to the micro-batch's loss (after loss weighting), or None; called after the forward."""

    def excludes_weight_decay(self, name: str) -> bool:
        """True for a parameter (named as in ``network.named_parameters()``) that gets weight decay 0; needs
        ``network``."""


class MergeableAdapter(Protocol):
    """Optional: folding the trained update into the base weights, and its strength. The training loop never calls
    these (it trains and saves unmerged); they are for Python users (evaluation, export). The conformance kit checks
    that a merged model's output equals the unmerged one when ``merge`` exists."""

    def merge(self) -> None:
        """Add the update (times the multiplier) into the base weights; the forward then stops adding it. Use
        :func:`anima_core.model.lora_files.add_to_weight`, which also re-quantises an fp8 base weight."""

    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (subtract what was added)."""

    def set_multiplier(self, value: float) -> None:
        """Scale the update (1 = as trained; for an additive update such as LoRA, 0 = off)."""


@runtime_checkable
class TimestepSamplerProtocol(Protocol):
    """What ``build(options, total_steps=total_steps)`` of a timestep sampler returns.

    t is the rectified-flow time, which is also the σ the DiT is fed: x_t = (1 − t)·x0 + t·ε, so t = 0 is the clean
    latent and **t = 1 pure noise**; the velocity target is ε − x0. (Papers that write σ for the noise-to-signal
    ratio t / (1 − t) mean something else.)
    """

    def sample(self, batch_size: int, generator: Optional["torch.Generator"] = None) -> "torch.Tensor":
        """t for one micro-batch: a float tensor of shape ``[batch_size]`` on the CPU, every value in the open
        interval (0, 1) (core's samplers clamp to [1e-4, 1 − 1e-4]); fp32 is expected (core casts to fp32 on the
        device). The loop always passes a CPU ``generator``, seeded per optimizer step; **every random draw must
        come from it** (``torch.rand(n, generator=generator)``), never from the global RNG, so runs and resumes are
        reproducible. ``generator=None`` (direct use) may draw from the global RNG."""
        ...


class TimestepSamplerHooks(Protocol):
    """Optional: adaptive samplers learn from the raw per-sample MSE and refresh after optimizer steps."""

    def record(self, t: "torch.Tensor", raw_mse: "torch.Tensor") -> None:
        """After each micro-batch's forward: its t and unweighted per-sample velocity MSE (both ``[n]``, fp32, on
        the CPU), regularisation images left out."""

    def maybe_refresh(self, global_step: int) -> None:
        """After each optimizer step, with the number of steps done (1 after the first), on every process."""

    def status(self) -> dict[str, Any]:
        """After each optimizer step; numeric values are logged as ``timestep_sampler/<key>``."""

    def state_dict(self) -> dict[str, Any]:
        """Saved with every state: plain lists, numbers and tensors only (states load with ``weights_only``)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """On resume, with what :meth:`state_dict` returned."""


@runtime_checkable
class LossProtocol(Protocol):
    def compute(self, pred: "torch.Tensor", target: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        """``pred``/``target``: fp32 velocity prediction and target ``[B, C, (T,) H, W]``, ``t``: ``[B]``. Returns
        the per-element loss, same shape as ``pred``, no reduction (core averages and applies loss weighting)."""
        ...


@runtime_checkable
class InferenceSamplerProtocol(Protocol):
    def sample(self, denoise_fn: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"], x: "torch.Tensor",
               sigmas: "torch.Tensor", **kw: Any) -> "torch.Tensor":
        """Integrate from ``sigmas[0]`` (1 = pure noise) to ``sigmas[-1]`` (0); ``denoise_fn(x, sigma)`` with
        ``sigma`` of shape ``[B]`` returns the clean-sample estimate. ``kw`` holds ``generator`` (draw every random
        number from it), ``callback`` and ``shift``; ignore keys you do not use."""
        ...


class OptimizerBuilder(Protocol):
    """``build(options, param_groups)``: ``param_groups`` is what the adapter's ``get_param_groups`` returned (plus
    a weight-decay-free group core splits off). Return a ``torch.optim.Optimizer``."""

    def __call__(self, options: Any, param_groups: list[dict]) -> "torch.optim.Optimizer": ...


class LRSchedulerBuilder(Protocol):
    """``build(options, optimizer, total_steps)``, positionally, once the optimizer exists.

    **The scheduler applies** ``options.warmup_steps`` (core does not): core only calls ``scheduler.step()`` once
    after every optimizer step (never for ``schedule_free`` optimizers), reads ``optimizer.param_groups[i]["lr"]``
    and saves/restores ``state_dict()``. The lr in effect at optimizer step k (k = 1, 2, ...) is what the scheduler
    set after k − 1 calls of ``step()``. Core's schedulers (``torch.optim.lr_scheduler.LambdaLR``) use the factor
    (k − 1) / warmup_steps during warm-up, as diffusers' and sd-scripts' schedulers do: **step 1 runs at lr 0**
    (Adam-type moments still update), step k at (k − 1)/warmup_steps of the lr, and the full lr from step
    ``warmup_steps + 1``; without warm-up step 1 runs at the full lr.
    """

    def __call__(self, options: Any, optimizer: "torch.optim.Optimizer",
                 total_steps: int) -> "torch.optim.lr_scheduler.LRScheduler": ...


def call_optional(obj: object, hook: str, *args: Any, default: Any = None, **kwargs: Any) -> Any:
    """Call ``obj.hook(...)`` if the object implements it, else return ``default``."""
    fn = getattr(obj, hook, None)
    return default if fn is None else fn(*args, **kwargs)
