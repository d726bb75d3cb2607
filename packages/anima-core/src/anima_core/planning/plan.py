"""``anima plan``: the device peak of one training step of a configured model, by category, planned on fake tensors
(no GPU, no tensor data read), the host RAM the load needs, and the cheapest settings that fit a VRAM budget.

How the figures come about:

- The model set is built from the checkpoint headers (or the published shapes) on the meta device and
  materialised as fake tensors (``FakeTensorMode``) in ``model.dtype``; fp8 (``base_precision``,
  ``text_encoder_precision``) is applied as training applies it. :mod:`anima_core.planning.step` assembles the
  adapter and optimizer and tracks one steady-state step with torch's ``MemTracker`` (storages rounded to 512 B).
- Categories of the step peak: *base weights* = tracked parameters + buffers minus the adapter's parameters and
  minus the text encoder; *adapter + grads + optimizer* = adapter parameters + gradients + optimizer state;
  *activations* = activations + temporaries (+ "other"); *text encoder* = Qwen3's weights when it stays on the
  device (``dataset.cache_text_encoder: false``); *swap buffers* = block swap's device slots.
- Block swap (``model.blocks_to_swap: N``): the last N blocks' frozen weights leave the device (taken off base
  weights; they become pinned host memory) and :class:`anima_core.model.block_swap.BlockSwap`'s slots (2 × the
  largest swapped block) are added. Activations do not change with swap (it needs gradient checkpointing), so the
  step is measured once and the swap applied to its figures.
- The VAE is on the device only while the latent cache fills (:mod:`anima_core.training.residency`): its weights
  are reported as "during caching", not in the step; its encode activations are not planned.
- Host RAM: the biggest of (the largest component as the load holds it: tensor by tensor from a mmapped file into
  ``model.dtype`` on the host, then moved) and (what stays on the host during training: pinned swapped blocks, the
  VAE, the text encoder when cached and previews need it), plus :data:`HOST_OVERHEAD` for Python, torch and the
  libraries (an assumption, not a measurement). Data caches and the data loader's workers are not included.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Optional

GB = 1e9
GIB = 2 ** 30
HOST_OVERHEAD = int(1.5 * GB)  # Python + torch + diffusers/transformers imported, CUDA context host side (assumed)
CATEGORIES = ("base weights", "adapter + grads + optimizer", "activations", "text encoder", "swap buffers")

# What each setting costs in speed, as far as known (issue 16).
SPEED = {
    "gradient_checkpointing": "≈ +30 % compute (one extra forward of every block in backward)",
    "cache_text_encoder": "none per step (captions are encoded once before training; needs fixed captions)",
    "base_precision": "dequantises each fp8 weight per forward (and again in backward); not measured",
    "blocks_to_swap": "all 28 blocks: +11 % step time in the public reference trainer (RTX 5090, 1024², bs 1, "
                      "GC on); fewer blocks cost less; not measured here",
    "batch_size": "fewer images per step: more steps per epoch (raise train.grad_accum to keep the effective "
                  "batch)",
    "compile": "none in steady state (the first steps compile)",
}


@dataclass(frozen=True)
class PlanSettings:
    """The settings that move the device peak."""

    gradient_checkpointing: bool
    cache_text_encoder: bool
    base_fp8: bool
    text_encoder_fp8: bool
    blocks_to_swap: int
    batch_size: int
    width: int
    height: int
    dtype: str  # model.dtype: bf16, fp16, fp32
    vae_dtype: str
    mixed_precision: str
    grad_clip: float
    previews: bool  # sample.prompts set: the cached text encoder stays on the host instead of being freed

    def changed(self, **kw: Any) -> PlanSettings:
        return dataclasses.replace(self, **kw)


def settings_from_config(config) -> PlanSettings:
    m, d, t = config.model, config.dataset, config.train
    side = max(d.resolution)  # the largest bucket area is the square base-resolution bucket of the largest one
    return PlanSettings(gradient_checkpointing=m.gradient_checkpointing, cache_text_encoder=d.cache_text_encoder,
                        base_fp8=m.base_precision == "fp8", text_encoder_fp8=m.text_encoder_precision == "fp8",
                        blocks_to_swap=m.blocks_to_swap, batch_size=t.batch_size, width=side, height=side,
                        dtype=m.dtype, vae_dtype=m.vae_dtype, mixed_precision=t.mixed_precision,
                        grad_clip=t.grad_clip, previews=bool(config.sample.prompts))


@dataclass
class Plan:
    settings: PlanSettings
    device: dict[str, int]  # CATEGORIES → bytes at the step peak
    caching: dict[str, int]  # device bytes while the latent cache fills ("vae weights")
    host: dict[str, int]  # host RAM terms
    phase: str  # where the step peak fell
    tracker: dict[str, int]  # MemTracker's raw peak by reference type (before block swap)
    blocks: int  # DiT blocks
    swap_host_bytes: int = 0
    block_weight_bytes: list[int] = field(default_factory=list)  # frozen bytes per block, as the tracker counts
    layout_bytes: list[int] = field(default_factory=list)  # BlockSwap's buffer bytes per block
    base_unswapped: int = 0  # base weights on the device without block swap
    block_linear_weight_bytes: int = 0  # the frozen Linear weights of the DiT blocks (what fp8 stores in 1 byte)
    seconds: float = 0.0
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return self.host["peak"]

    def with_swap(self, n: int) -> Plan:
        """This plan with ``blocks_to_swap: n`` instead (activations do not depend on it)."""
        return _apply_swap(dataclasses.replace(self, device=dict(self.device), host=dict(self.host),
                                               settings=self.settings.changed(blocks_to_swap=n)))


def _torch_dtype(name: str):
    from anima_core.model.models import resolve_dtype

    return resolve_dtype(name)


def _round(n: int, multiple: int = 512) -> int:
    return -(-n // multiple) * multiple


def _frozen_bytes(module) -> int:
    tensors = [p for p in module.parameters() if not p.requires_grad] + list(module.buffers())
    return sum(_round(t.numel() * t.element_size()) for t in tensors)


def plan(config, registry, *, shapes=None, architecture: Optional[str] = None,
         settings: Optional[PlanSettings] = None) -> Plan:
    """Plan one training step of ``config`` (with ``settings`` overriding what the config says)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from anima_core.model.block_swap import _layout
    from anima_core.model.dit import quantizes as dit_quantizes
    from anima_core.planning import step
    from anima_core.planning.build import build_meta, materialize, parameter_count, tensor_bytes
    from anima_core.planning.shapes import shapes_from_config

    started = time.perf_counter()
    if shapes is None:
        shapes = shapes_from_config(config.model, architecture)
    s = settings or settings_from_config(config)
    dtype, vae_dtype = _torch_dtype(s.dtype), _torch_dtype(s.vae_dtype)
    blocks_total = int(shapes.dit["num_layers"])
    if s.blocks_to_swap > blocks_total:
        from anima_core.errors import UserError

        raise UserError(f"model.blocks_to_swap: {s.blocks_to_swap} is more than the {blocks_total} blocks of the "
                        f"model")
    meta = build_meta(shapes, with_vae=True)
    vae_bytes = sum(_round(p.numel() * vae_dtype.itemsize) for p in meta.vae.parameters())
    te_resident = not s.cache_text_encoder
    cfg = config.model_copy(update={"train": config.train.model_copy(update={"mixed_precision": s.mixed_precision})})
    with FakeTensorMode():
        dit = materialize(meta.dit, dtype)
        qwen = materialize(meta.qwen, dtype) if te_resident else None
        trainee = step.assemble(dit, qwen, cfg, registry, dtype=dtype,
                                gradient_checkpointing=s.gradient_checkpointing, base_fp8=s.base_fp8,
                                text_encoder_fp8=s.text_encoder_fp8, text_encoder_resident=te_resident)
        shape = step.StepShape(s.batch_size, s.width, s.height, mixed_precision=s.mixed_precision,
                               grad_clip=s.grad_clip)
        memory = step.measure(trainee, shape, qwen_hidden_size=int(shapes.qwen["hidden_size"]), count_flops=False)
        blocks = list(dit.transformer.transformer_blocks)
        block_bytes = [_frozen_bytes(b) for b in blocks]
        layout_bytes = [_layout(b)[1] for b in blocks]  # BlockSwap's host buffer / slot size per block
        te_bytes = tensor_bytes(qwen, rounding=512) if qwen is not None else 0
        block_linear = sum(m.weight.numel() * m.weight.element_size() for path, m in dit.named_modules()
                           if isinstance(m, torch.nn.Linear) and dit_quantizes(path) and not m.weight.requires_grad)
        adapter_bytes = sum(_round(p.numel() * p.element_size()) for p in trainee.params)
        dit_host = sum(t.numel() * t.element_size() for t in [*dit.parameters(), *dit.buffers()]
                       if not t.requires_grad)
    peak = memory.peak
    weights = peak.get("Parameter", 0) + peak.get("Buffer", 0)
    device = {
        "base weights": weights - adapter_bytes - te_bytes,
        "adapter + grads + optimizer": adapter_bytes + peak.get("Gradient", 0) + peak.get("Optstate", 0),
        "activations": peak.get("Activation", 0) + peak.get("Temp", 0) + peak.get("Other", 0),
        "text encoder": te_bytes,
        "swap buffers": 0,
    }
    # host RAM: published shapes have no files; their bf16 size is the parameter count × 2
    files = shapes.files
    file_bytes = {k: f.file_bytes for k, f in files.items()}
    elem = {"transformer": parameter_count(meta.dit), "text_encoder": parameter_count(meta.qwen),
            "vae": parameter_count(meta.vae)}
    for key, n in elem.items():
        if not file_bytes.get(key):
            file_bytes[key] = n * 2
    as_loaded = {"transformer": dit_host, "text_encoder": elem["text_encoder"] * dtype.itemsize,
                 "vae": elem["vae"] * vae_dtype.itemsize}
    load = max(max(file_bytes[k], as_loaded[k]) for k in as_loaded)
    host = {
        "load (largest component)": load,
        "vae on host": as_loaded["vae"],
        "text encoder on host": as_loaded["text_encoder"] if (s.cache_text_encoder and s.previews) else 0,
        "pinned swapped blocks": 0,
        "python + torch (assumed)": HOST_OVERHEAD,
    }
    result = Plan(settings=s, device=device, caching={"vae weights": vae_bytes}, host=host, phase=memory.phase,
                  tracker=dict(peak), blocks=blocks_total, block_weight_bytes=block_bytes,
                  layout_bytes=layout_bytes, base_unswapped=device["base weights"],
                  block_linear_weight_bytes=block_linear,
                  source=shapes.files["transformer"].source, warnings=list(shapes.warnings))
    result = _apply_swap(result)
    result.seconds = time.perf_counter() - started
    return result


def _apply_swap(p: Plan) -> Plan:
    """Recompute the swap-dependent figures of ``p`` from its unswapped measurement."""
    n = p.settings.blocks_to_swap
    swapped = p.block_weight_bytes[len(p.block_weight_bytes) - n:] if n else []
    p.device["base weights"] = p.base_unswapped - sum(swapped)
    # BlockSwap: one flat host buffer per swapped block, min(2, n) device slots of the largest one
    layouts = p.layout_bytes[len(p.layout_bytes) - n:] if n else []
    p.device["swap buffers"] = _round(max(layouts)) * min(2, n) if n else 0
    p.swap_host_bytes = sum(layouts)
    p.host["pinned swapped blocks"] = p.swap_host_bytes
    steady = p.host["vae on host"] + p.host["text encoder on host"] + p.host["pinned swapped blocks"]
    p.host["peak"] = p.host["python + torch (assumed)"] + max(p.host["load (largest component)"], steady)
    return p


# -- fitting a budget ----------------------------------------------------------------------------------------------

@dataclass
class FitStep:
    setting: str  # config key
    value: Any
    plan: Plan
    speed: str


@dataclass
class Fit:
    budget: int
    base: Plan
    steps: list[FitStep]  # the changes applied, cheapest first (each plan includes the earlier ones)
    fits: bool

    @property
    def final(self) -> Plan:
        return self.steps[-1].plan if self.steps else self.base


def fit(config, registry, budget_bytes: int, *, architecture: Optional[str] = None, base: Optional[Plan] = None,
        shapes=None) -> Fit:
    """The cheapest settings that fit ``budget_bytes``, trying in this order (each kept once applied): gradient
    checkpointing, the text-encoder cache, fp8 base weights, the fewest swapped blocks, then halving the batch."""
    from anima_core.planning.shapes import shapes_from_config

    if shapes is None:
        shapes = shapes_from_config(config.model, architecture)
    current = base or plan(config, registry, shapes=shapes)
    steps: list[FitStep] = []
    if current.total <= budget_bytes:
        return Fit(budget_bytes, current, steps, True)
    base_plan = current

    def replan(s: PlanSettings) -> Plan:
        return plan(config, registry, shapes=shapes, settings=s)

    s = current.settings
    for key, attr, value in (("model.gradient_checkpointing", "gradient_checkpointing", True),
                             ("dataset.cache_text_encoder", "cache_text_encoder", True),
                             ("model.base_precision", "base_fp8", True)):
        if getattr(s, attr) == value:
            continue
        s = s.changed(**{attr: value})
        current = replan(s.changed(blocks_to_swap=0)).with_swap(s.blocks_to_swap) if s.blocks_to_swap else replan(s)
        short = key.split(".")[-1]
        steps.append(FitStep(key, "fp8" if attr == "base_fp8" else value, current, SPEED[short]))
        if current.total <= budget_bytes:
            return Fit(budget_bytes, base_plan, steps, True)
    while True:
        if s.gradient_checkpointing:
            for n in range(s.blocks_to_swap + 1, current.blocks + 1):
                trial = current.with_swap(n)
                if trial.total <= budget_bytes:
                    steps.append(FitStep("model.blocks_to_swap", n, trial, SPEED["blocks_to_swap"]))
                    return Fit(budget_bytes, base_plan, steps, True)
            if current.settings.blocks_to_swap < current.blocks:
                current = current.with_swap(current.blocks)
                s = current.settings
                steps.append(FitStep("model.blocks_to_swap", current.blocks, current, SPEED["blocks_to_swap"]))
        if s.batch_size <= 1:
            return Fit(budget_bytes, base_plan, steps, False)
        s = s.changed(batch_size=max(1, s.batch_size // 2))
        unswapped = replan(s.changed(blocks_to_swap=0))
        # the smallest swap that fits at the smaller batch (back to none if it fits without)
        for n in range(0, unswapped.blocks + 1):
            trial = unswapped.with_swap(n)
            if trial.total <= budget_bytes or n == unswapped.blocks:
                break
        current, s = trial, trial.settings
        steps.append(FitStep("train.batch_size", s.batch_size, current, SPEED["batch_size"]))
        if current.total <= budget_bytes:
            if s.blocks_to_swap:
                steps.append(FitStep("model.blocks_to_swap", s.blocks_to_swap, current, SPEED["blocks_to_swap"]))
            return Fit(budget_bytes, base_plan, steps, True)


# -- text --------------------------------------------------------------------------------------------------------

def _gb(n: int) -> str:
    """GB (10^9 bytes) above 0.1 GB, MB below (the tiny test model)."""
    return f"{n / GB:7.2f} GB" if n >= 0.1 * GB or n == 0 else f"{n / 1e6:7.2f} MB"


def render(p: Plan) -> str:
    s = p.settings
    lines = [f"plan of one training step: {p.source}",
             f"  {s.width}x{s.height}, batch {s.batch_size}, model.dtype {s.dtype}, mixed precision "
             f"{s.mixed_precision}, gradient_checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
             f"cache_text_encoder {'on' if s.cache_text_encoder else 'off'}, base_precision "
             f"{'fp8' if s.base_fp8 else 'dtype'}, blocks_to_swap {s.blocks_to_swap}",
             "device peak (GPU) of a steady-state step:"]
    for name in CATEGORIES:
        note = ""
        if name == "text encoder" and s.cache_text_encoder:
            note = "  (cached: off the device)"
        if name == "swap buffers" and s.blocks_to_swap:
            note = f"  ({min(2, s.blocks_to_swap)} slots of one block)"
        lines.append(f"  {name:<30}{_gb(p.device[name])}{note}")
    lines.append(f"  {'total':<30}{_gb(p.total)}  (peak in {p.phase}; {p.total / GIB:.2f} GiB)")
    lines.append(f"  {'vae (during caching only)':<30}{_gb(p.caching['vae weights'])}  (weights; off the device "
                 f"during the steps)")
    lines.append("host RAM:")
    for name in ("load (largest component)", "pinned swapped blocks", "vae on host", "text encoder on host",
                 "python + torch (assumed)"):
        lines.append(f"  {name:<30}{_gb(p.host[name])}")
    lines.append(f"  {'peak':<30}{_gb(p.host['peak'])}  (overhead + max(load, what stays on the host))")
    for w in p.warnings:
        lines.append(f"warning: {w}")
    lines.append(f"planned in {p.seconds:.1f} s on fake tensors (no GPU, no tensor data read)")
    return "\n".join(lines)


def render_fit(f: Fit) -> str:
    budget = f"{f.budget / GB:g} GB"
    if not f.steps:
        return f"fits in {budget}: the step peaks at {_gb(f.base.total).strip()} as configured"
    lines = [f"does not fit as configured: the step peaks at {_gb(f.base.total).strip()}, more than {budget}"]
    lines.append("cheapest settings that fit, in order (each includes the ones above):" if f.fits else
                 "tried, in order (each includes the ones above):")
    for st in f.steps:
        value = str(st.value).lower() if isinstance(st.value, bool) else st.value
        lines.append(f"  {st.setting}: {value} -> {_gb(st.plan.total).strip()} on the device, "
                     f"{_gb(st.plan.host_total).strip()} host RAM; speed: {st.speed}")
    if f.fits:
        lines.append(f"fits in {budget} with these settings")
    else:
        lines.append(f"does not fit in {budget}: even with every setting above the step needs "
                     f"{_gb(f.final.total).strip()} (lower dataset.resolution, or use a bigger card)")
    return "\n".join(lines)


def estimate_device_peak(config, *, architecture: Optional[str] = None, registry=None) -> Plan:
    """The planned step (``.total``: device peak bytes) of a config mapping or a validated config; what
    ``bench/gpu_step.py`` puts beside the measured peak."""
    if registry is None:
        from anima_core.plugin_host import get_host

        registry = get_host().registry
    if isinstance(config, dict):
        from anima_core.config.loading import validate_config

        config = validate_config(config, registry).config
    return plan(config, registry, architecture=architecture)
