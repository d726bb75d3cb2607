"""One training step, measured with torch's ``MemTracker``: the same code runs on fake tensors (the plan) and on real
CPU tensors (the check that the plan is right).

The step is the loop's micro-batch plus the optimizer step (``training/phases/loop.py``): noise and timesteps →
(text encoder forward without grad, when it is not cached) → ``TrainModule`` forward under the mixed-precision policy
→ fp32 MSE on the velocity → backward → gradient clipping → ``optimizer.step()`` → ``zero_grad(set_to_none=True)``.
Before the measured step a warm-up ``optimizer.step()`` on zero gradients creates the optimizer state, so the
measured step is a steady-state step (what every step after the first holds). Each tracked storage is rounded up to
512 bytes, as CUDA's caching allocator does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from anima_core.planning.autocast import autocast_for, checkpoint_function

CUDA_ROUNDING = 512  # bytes: the CUDA caching allocator's smallest block
LATENT_CHANNELS = 16
VAE_FACTOR = 8


@dataclass
class StepShape:
    """What one micro-batch looks like."""

    batch_size: int
    width: int
    height: int
    qwen_tokens: int = 512
    t5_tokens: int = 512
    mixed_precision: str = "bf16"
    grad_clip: float = 1.0


@dataclass
class Trainee:
    """The model set assembled as training assembles it, ready to step."""

    train_module: nn.Module
    adapter: Any
    optimizer: Any
    params: list
    qwen: Optional[nn.Module]  # None when the text encoder is not on the device during the step
    dtype: torch.dtype
    policy: Any  # the mixed-precision policy (a CudaAutocast or a null context)
    fp8_linears: int = 0  # Linear layers stored in fp8 by anima_core.model.fp8 (0: not applied)


@dataclass
class StepMemory:
    """The device peak of a measured step, split by MemTracker's reference types (bytes), and the step's FLOPs."""

    peak: dict[str, int]
    flops: int
    phase: str = ""  # where the peak fell: forward, backward or optimizer

    @property
    def total(self) -> int:
        return self.peak.get("Total", 0)


def fp8_module():
    """``anima_core.model.fp8`` if it is installed with ``quantize_linears_``, else None (then fp8 is estimated)."""
    try:
        from anima_core.model import fp8
    except ImportError:
        return None
    return fp8 if hasattr(fp8, "quantize_linears_") else None


def _prefer_foreach(optimizer) -> None:
    # On CUDA torch's optimizers default to the foreach implementation (its temporaries are part of the peak); on the
    # CPU they default to the per-tensor loop. Ask for what CUDA would run.
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = True


def assemble(dit, qwen: Optional[nn.Module], config, registry, *, dtype: torch.dtype,
             gradient_checkpointing: bool, base_fp8: bool, text_encoder_fp8: bool,
             text_encoder_resident: bool) -> Trainee:
    """Precision, gradient checkpointing, the adapter and the optimizer as ``training/phases/{models,optimizer}.py``
    set them up. Call under a ``FakeTensorMode`` for the plan (every new tensor is then fake)."""
    from anima_core.training.phases.optimizer import _param_groups
    from anima_core.training.train_module import TrainModule

    policy = autocast_for(config.train.mixed_precision)
    fp8 = fp8_module()
    fp8_count = 0
    if base_fp8 and fp8 is not None:  # the Linears training stores in fp8: those of the DiT blocks
        from anima_core.model import dit as dit_module

        fp8_count = fp8.quantize_linears_(dit, dtype, dit_module.quantizes)
    if text_encoder_fp8 and text_encoder_resident and qwen is not None and fp8 is not None:
        from anima_core.model import text_encoder

        fp8.quantize_linears_(qwen, dtype, text_encoder.quantizes)
    if gradient_checkpointing:
        for module in (dit.transformer, dit.text_conditioner):
            module.enable_gradient_checkpointing(checkpoint_function(policy))
    else:
        dit.set_gradient_checkpointing(False)
    adapter = registry.spec("adapter", config.adapter.type).build(config.adapter)
    adapter.inject(dit)
    train_module = TrainModule(dit, adapter)
    train_module.train()
    groups = _param_groups(adapter, config.optimizer.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = registry.spec("optimizer", config.optimizer.type).build(config.optimizer, groups)
    _prefer_foreach(optimizer)
    return Trainee(train_module, adapter, optimizer, params, qwen if text_encoder_resident else None, dtype, policy,
                   fp8_count)


@contextlib.contextmanager
def cuda_rounding(multiple: int = CUDA_ROUNDING):
    """MemTracker rounds storages up to 512 bytes only for tensors on a CUDA device; do it for every device."""
    from torch.distributed._tools import mem_tracker

    info = getattr(mem_tracker, "_WeakRefInfo", None)
    original = getattr(info, "_calculate_mem_consumed", None)
    if original is None:  # a torch without this private hook: exact bytes
        yield
        return

    def rounded(self) -> int:
        return math.ceil(self.size * self.element_size / multiple) * multiple

    info._calculate_mem_consumed = rounded
    try:
        yield
    finally:
        info._calculate_mem_consumed = original


def _inputs(trainee: Trainee, shape: StepShape, qwen_hidden_size: int):
    from anima_core.model.text_encoder import TextBatch

    b = shape.batch_size
    lat = (b, LATENT_CHANNELS, 1, shape.height // VAE_FACTOR, shape.width // VAE_FACTOR)
    x0 = torch.randn(lat)
    noise = torch.randn(lat)
    t = torch.rand(b)
    ids = torch.zeros((b, shape.qwen_tokens), dtype=torch.long)
    mask = torch.ones((b, shape.qwen_tokens), dtype=torch.long)
    if b > 1:  # captions of different lengths: every row but the first ends in one padding token
        mask[1:, -1] = 0
    t5_ids = torch.zeros((b, shape.t5_tokens), dtype=torch.long)
    t5_mask = torch.ones((b, shape.t5_tokens), dtype=torch.long)
    text = TextBatch(ids, mask, t5_ids, t5_mask, torch.ones((b, shape.t5_tokens)))
    if trainee.qwen is None:  # cached: the stored hidden states come in with the batch
        hidden = torch.randn((b, shape.qwen_tokens, qwen_hidden_size)).to(trainee.dtype)
    else:
        hidden = None
    return x0, noise, t, text, hidden


def _step(trainee: Trainee, shape: StepShape, qwen_hidden_size: int, phase: list[str]) -> None:
    x0, noise, t, text, hidden = _inputs(trainee, shape, qwen_hidden_size)
    tb = t.view(-1, 1, 1, 1, 1)
    noisy = (1.0 - tb) * x0 + tb * noise
    target = noise - x0
    del x0, noise
    phase[0] = "forward"
    if hidden is None:
        with torch.no_grad():  # TextEncoder.encode_qwen
            # An all-ones mask is what transformers drops on real tensors (SDPA then runs is_causal, with no mask
            # tensor); it cannot read a fake mask's values, so say so here for the same path on both.
            mask = text.qwen_mask if shape.batch_size > 1 else None
            out = trainee.qwen(input_ids=text.qwen_ids, attention_mask=mask, use_cache=False)
            hidden = out.last_hidden_state * text.qwen_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            del out
        hidden = hidden.to(trainee.dtype)
    with trainee.policy:
        pred = trainee.train_module(noisy.to(trainee.dtype), t, hidden, text)
    loss = (pred.float() - target.float()).pow(2).mean()
    del pred, noisy, hidden
    phase[0] = "backward"
    loss.backward()
    del loss
    phase[0] = "optimizer"
    if shape.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainee.params, shape.grad_clip, foreach=True)
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)


def warm_up(trainee: Trainee) -> None:
    """Create the optimizer state (a step on zero gradients), as the first real step does."""
    for p in trainee.params:
        p.grad = torch.zeros_like(p)
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)


def _tracker_class():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class Tracker(MemTracker):
        """MemTracker with two changes, neither touching what it counts:

        - it accepts frozen parameters: torch 2.13's registers a gradient hook on every parameter of a module it
          meets, which raises for ``requires_grad=False`` ones (the whole frozen base model here);
        - it keeps the device-wide peak only. Upstream updates every tracked module's own peak after every op,
          walking all modules each time: O(ops × modules), which on the full-size model (~1,900 modules, ~100k ops
          with the recompute) takes most of an hour; the device peak alone is O(1) per op. It also remembers in
          which phase (``phase[0]``) the peak was reached.
        """

        def __init__(self, phase: list[str]) -> None:
            super().__init__()
            self.phase = phase
            self.peak_phase = ""

        def _update_peak_stats(self, peak_state) -> None:
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(dev_snap)
                    self.peak_phase = self.phase[0]

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            def grad_hook(grad):
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_memory = 0
            for param in module.parameters():
                winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                param_memory += sum(w.mem_consumed for w in winfos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
                if (install_grad_hooks and param.requires_grad
                        and self._param_to_grad_hook_handles.get(param, None) is None):
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)))
            buffer_memory = 0
            for buffer in module.buffers():
                winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
                buffer_memory += sum(w.mem_consumed for w in winfos)
            return param_memory, buffer_memory

    return Tracker


def measure(trainee: Trainee, shape: StepShape, *, qwen_hidden_size: int, count_flops: bool = True) -> StepMemory:
    """Warm up, then track one steady-state step; the device peak by reference type, and the step's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    warm_up(trainee)
    phase = ["setup"]
    with cuda_rounding():
        tracker = _tracker_class()(phase)
        tracker.track_external(trainee.train_module, trainee.optimizer,
                               *([trainee.qwen] if trainee.qwen is not None else []))
        flops = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        with tracker, flops:
            _step(trainee, shape, qwen_hidden_size, phase)
        snapshot = tracker.get_tracker_snapshot("peak")
    device_snap = next(iter(snapshot.values()), {})
    peak = {getattr(k, "value", str(k)): int(v) for k, v in device_snap.items()}
    total_flops = flops.get_total_flops() if count_flops else 0
    return StepMemory(peak, int(total_flops), tracker.peak_phase)
