"""Block swap (``model.blocks_to_swap``): the last N DiT blocks keep their frozen weights in host memory (pinned on
CUDA) and are brought onto the device just before they run, the next one prefetched on a side stream, so at most
``slots`` swapped blocks are resident at once.

Each swapped block owns one flat host byte buffer with all its parameters and buffers at aligned offsets (so fp8
weights and fp32 scales share it); ``slots`` device byte buffers are sized to the largest block. Onloading is one
copy host→slot plus re-pointing every tensor's ``.data`` at its view into the slot; releasing re-points it at an
empty placeholder, so running a block that was not onloaded fails loudly (on the CPU too). The Parameter objects
never change, so adapters holding the base modules (core's LoRA, lycoris) keep working, and nothing is copied back:
the weights are frozen. Eviction is lazy (LRU, only when a slot is needed), which makes the forward→backward turn
and the backward→next-forward turn free: the blocks needed next are the ones still resident.

Training needs gradient checkpointing: diffusers' Cosmos DiT then runs each block under non-reentrant
``torch.utils.checkpoint``, so autograd holds no reference to a block's weights between its forward and backward,
and the backward recomputes each block (through its forward pre-hook, in reverse block order) right before its
own backward. Inside backward, ``torch._C._current_graph_task_id() != -1`` tells recompute from forward; block
i+1's backward is over when block i's recompute starts (the engine runs nodes by descending sequence number).

Why not diffusers' group offloading (``diffusers/hooks/group_offloading.py``, 0.42.1): it offloads every block (no
"last N only"), its prefetch successor is fixed from the first forward's execution order, so the reverse-order
recompute would prefetch the wrong block and load each one synchronously; it offloads in ``post_forward``, which
the checkpoint's early-stopped recompute never reaches (it aborts the block by exception), so every recomputed
block would stay on the device until backward ends; and it allocates fresh device tensors per onload and, without
``record_stream``, synchronises the compute stream at every offload. Fixed slots plus events avoid all of that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

# Covers every dtype's alignment and CUDA's vectorised loads; the cost is at most a few KiB per block.
ALIGN = 256

Phase = Literal["forward", "recompute"]


@dataclass(frozen=True)
class BlockEvent:
    """A swapped block's entry, after its onload: what tests (and debugging) observe."""

    index: int
    phase: Phase
    resident: frozenset[int]


@dataclass
class _Tensor:
    tensor: torch.Tensor  # the Parameter / buffer object itself, re-pointed through .data
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class _Block:
    index: int
    module: nn.Module
    tensors: list[_Tensor]
    nbytes: int
    host: torch.Tensor | None = None
    slot: _Slot | None = None


@dataclass
class _Slot:
    buffer: torch.Tensor
    block: int | None = None
    last_used: int = 0
    ready: object | None = None  # torch.cuda.Event: the copy into this slot is done
    free: object | None = None  # torch.cuda.Event: the compute that read the evicted block is done
    free_recorded: bool = False
    stream: object | None = None  # the compute stream that last ran this slot's block


def _layout(block: nn.Module) -> tuple[list[tuple[torch.Tensor, int, int]], int]:
    entries, offset = [], 0
    for tensor in [*block.parameters(), *block.buffers()]:
        nbytes = tensor.numel() * tensor.element_size()
        entries.append((tensor, offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    return entries, offset


def _saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(True) is not None


class BlockSwap:
    """Swaps the last ``count`` of ``blocks`` between host buffers and ``slots`` device buffers.

    ``host_bytes`` is the host memory of all swapped blocks, ``slot_bytes`` the device memory of all slots (both
    known from construction, before :meth:`attach`). Cast dtypes before attaching: a later ``.to(dtype)`` of the
    model does not reach the host copies. Merging an adapter into swapped weights does not persist (the next
    onload rewrites the slot), so sample with the adapter unmerged."""

    def __init__(self, blocks: Sequence[nn.Module], count: int, device: torch.device | str, *, slots: int = 2,
                 recorder: Callable[[BlockEvent], None] | None = None) -> None:
        blocks = list(blocks)
        if not 1 <= count <= len(blocks):
            raise ValueError(f"block swap: cannot swap {count} blocks of a model with {len(blocks)} blocks "
                             f"(1 to {len(blocks)})")
        if slots < 1:
            raise ValueError(f"block swap: slots must be at least 1 (found {slots})")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.swapped: tuple[int, ...] = tuple(range(len(blocks) - count, len(blocks)))
        self.slots = min(slots, count)  # more slots than blocks would never be used
        self.recorder = recorder
        self._cuda = device.type == "cuda"
        self._blocks = {i: _Block(i, blocks[i], [], 0) for i in self.swapped}
        self._position = {index: pos for pos, index in enumerate(self.swapped)}
        self._slots: list[_Slot] = []
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self._handles: list = []
        self._clock = 0
        self._copy_stream = None
        self._attached = False
        self._plan()

    def _plan(self) -> None:
        for blk in self._blocks.values():
            blk.nbytes = _layout(blk.module)[1]
        self.host_bytes = sum(b.nbytes for b in self._blocks.values())
        self.slot_bytes = self.slots * max(b.nbytes for b in self._blocks.values())

    # -- attaching ---------------------------------------------------------------------------------------------
    def _check(self) -> None:
        for index, blk in self._blocks.items():
            for name, param in blk.module.named_parameters():
                if param.requires_grad:
                    raise ValueError(f"block swap: parameter {name!r} of block {index} requires grad; swapped "
                                     f"blocks must be frozen (an adapter must keep its trainable parameters "
                                     f"outside the blocks, as core's LoRA does)")
            for name, tensor in [*blk.module.named_parameters(), *blk.module.named_buffers()]:
                if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.layout != torch.strided \
                        or tensor.is_meta:
                    raise ValueError(f"block swap: {name!r} of block {index} is not a plain dense tensor "
                                     f"({type(tensor).__name__}, {tensor.layout}, {tensor.device}); only those "
                                     f"can live in a byte buffer")

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    def attach(self) -> BlockSwap:
        """Move the swapped blocks' tensors into host buffers (device placeholders in their place) and install the
        hooks. The caller moves the rest of the model."""
        if self._attached:
            raise RuntimeError("block swap is already attached")
        self._check()
        self._plan()
        for blk in self._blocks.values():
            entries, total = _layout(blk.module)
            host = torch.empty(total, dtype=torch.uint8, pin_memory=self._cuda)
            blk.tensors = []
            for tensor, offset, nbytes in entries:
                host[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
                blk.tensors.append(_Tensor(tensor, offset, nbytes, tensor.dtype, tensor.shape))
                tensor.data = self._placeholder(tensor.dtype)
            blk.host, blk.nbytes, blk.slot = host, total, None
        size = max(b.nbytes for b in self._blocks.values())
        self._slots = [_Slot(torch.empty(size, dtype=torch.uint8, device=self.device)) for _ in range(self.slots)]
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device=self.device)
            for slot in self._slots:
                slot.ready, slot.free = torch.cuda.Event(), torch.cuda.Event()
        for index, blk in self._blocks.items():
            self._handles.append(blk.module.register_forward_pre_hook(
                lambda module, args, index=index: self._enter(index)))
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove the hooks and give every swapped block ordinary device tensors again."""
        if not self._attached:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._cuda:
            torch.cuda.synchronize(self.device)
        for blk in self._blocks.values():
            for t in blk.tensors:
                host = blk.host[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape)
                t.tensor.data = torch.empty(t.shape, dtype=t.dtype, device=self.device).copy_(host)
            blk.host, blk.slot, blk.tensors = None, None, []
        self._slots, self._placeholders, self._copy_stream = [], {}, None
        self._attached = False

    def resident(self) -> frozenset[int]:
        return frozenset(slot.block for slot in self._slots if slot.block is not None)

    # -- swapping ----------------------------------------------------------------------------------------------
    def _next(self, index: int, backward: bool) -> int | None:
        """The swapped block expected to run after ``index``."""
        pos, last = self._position[index], len(self.swapped) - 1
        if last == 0:
            return None
        if backward:
            # After the first swapped block's recompute the next forward begins with it, then its successor.
            pos = pos - 1 if pos > 0 else 1
        elif pos < last:
            pos += 1
        else:
            # A grad-enabled forward turns into a backward, which recomputes from the end; a no-grad one (sampling)
            # is followed by the next call's forward from the start.
            pos = pos - 1 if torch.is_grad_enabled() else 0
        return self.swapped[pos]

    def _take_slot(self, running: int, keep: int | None) -> _Slot | None:
        """A free slot, else the least recently used one not holding ``running`` (preferably not ``keep``)."""
        for slot in self._slots:
            if slot.block is None:
                return slot
        candidates = [s for s in self._slots if s.block != running]
        if not candidates:
            return None
        preferred = [s for s in candidates if s.block != keep] or candidates
        victim = min(preferred, key=lambda s: s.last_used)
        self._evict(victim)
        return victim

    def _evict(self, slot: _Slot) -> None:
        blk = self._blocks[slot.block]
        for t in blk.tensors:
            t.tensor.data = self._placeholder(t.dtype)
        blk.slot, slot.block = None, None
        if self._cuda and slot.stream is not None:
            # Everything queued so far on the compute stream includes the evicted block's kernels: the next copy
            # into this slot waits for them.
            slot.free.record(slot.stream)
            slot.free_recorded = True

    def _load(self, index: int, slot: _Slot) -> None:
        blk = self._blocks[index]
        target = slot.buffer[:blk.nbytes]
        if self._cuda:
            with torch.cuda.stream(self._copy_stream):
                if slot.free_recorded:
                    self._copy_stream.wait_event(slot.free)
                target.copy_(blk.host, non_blocking=True)
                slot.ready.record(self._copy_stream)
        else:
            target.copy_(blk.host)
        for t in blk.tensors:
            t.tensor.data = slot.buffer[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape)
        self._clock += 1
        blk.slot, slot.block, slot.last_used = slot, index, self._clock

    def _enter(self, index: int) -> None:
        backward = torch._C._current_graph_task_id() != -1
        if (not backward and torch.is_grad_enabled() and len(self.swapped) > self.slots
                and not _saved_tensor_hooks_active()):
            raise RuntimeError(f"block swap: block {index} ran with grad enabled outside gradient checkpointing; "
                               f"autograd would keep its swapped-out weights for backward and read overwritten "
                               f"slots. Enable gradient checkpointing, or run under torch.no_grad()")
        blk = self._blocks[index]
        if any(t.tensor.requires_grad for t in blk.tensors):
            # Its gradient and optimizer step would land in a slot that the next onload overwrites.
            raise RuntimeError(f"block swap: a parameter of swapped block {index} was made trainable after "
                               f"attach; swapped blocks must stay frozen")
        upcoming = self._next(index, backward)
        if blk.slot is None:
            self._load(index, self._take_slot(index, upcoming))
        slot = blk.slot
        self._clock += 1
        slot.last_used = self._clock
        if upcoming is not None and self._blocks[upcoming].slot is None:
            spare = self._take_slot(index, None)
            if spare is not None:
                self._load(upcoming, spare)
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(slot.ready)
            slot.stream = stream
        if self.recorder is not None:
            self.recorder(BlockEvent(index, "recompute" if backward else "forward", self.resident()))


def attach_block_swap(dit, count: int, device) -> BlockSwap | None:
    """Moves the whole DiT (AnimaDiT) to ``device`` except the last ``count`` blocks, which go to host buffers.
    count == 0 -> plain ``dit.to(device)``, returns None. count > number of blocks -> ValueError naming both."""
    blocks = dit.transformer.transformer_blocks
    if not 0 <= count <= len(blocks):
        raise ValueError(f"model.blocks_to_swap is {count} but the DiT has {len(blocks)} blocks "
                         f"(0 to {len(blocks)})")
    if count == 0:
        dit.to(device)
        return None
    # Attach first: the swapped blocks then never occupy the device in full.
    swap = BlockSwap(blocks, count, device).attach()
    dit.to(device)
    return swap
