"""Block swap on the CPU with tiny fp32 DiTs: the same training result as without it, the residency contract seen
through the recorder and the tensors themselves, sampling, detach, and the refusals."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from anima_core.builtins.adapters import LoRAOptions
from anima_core.lora import LoRAAdapter
from anima_core.model.block_swap import BlockEvent, BlockSwap, attach_block_swap
from anima_core.model.dit import AnimaDiT
from anima_core.testing.tiny import tiny_configs


def tiny_dit(num_layers: int, seed: int = 0) -> AnimaDiT:
    """The tiny DiT with more blocks, every weight drawn afresh (so a wrong or stale weight changes outputs)."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    cfg = tiny_configs()
    cfg["dit"]["num_layers"] = num_layers
    with torch.random.fork_rng(devices=[]):
        dit = AnimaDiT(CosmosTransformer3DModel(**cfg["dit"]), AnimaTextConditioner(**cfg["adapter"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif param.dim() == 1:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))
    dit.requires_grad_(False)
    return dit.float().eval()


@pytest.fixture(scope="module")
def dit4():
    return tiny_dit(4)


def batch(step: int, batch_size: int = 1):
    gen = torch.Generator().manual_seed(100 + step)
    latents = torch.randn(batch_size, 16, 8, 8, generator=gen)
    sigma = torch.rand(batch_size, generator=gen)
    context = torch.randn(batch_size, 8, 32, generator=gen)
    target = torch.randn(batch_size, 16, 8, 8, generator=gen)
    return latents, sigma, context, target


def blocks_of(dit):
    return dit.transformer.transformer_blocks


def actual_resident(blocks, swapped) -> frozenset[int]:
    """Residency read off the tensors: a swapped block is wholly onloaded or wholly placeholders."""
    out = set()
    for index in swapped:
        sizes = [t.numel() > 0 for t in [*blocks[index].parameters(), *blocks[index].buffers()]]
        assert all(sizes) or not any(sizes), f"block {index} is half onloaded"
        if all(sizes):
            out.add(index)
    return frozenset(out)


def train_lora(dit, count: int, slots: int = 2, steps: int = 3, inject_after: bool = False, recorder=None):
    dit.set_gradient_checkpointing(True)
    torch.manual_seed(1)
    adapter = LoRAAdapter(LoRAOptions(rank=4, alpha=4.0))
    swap = None
    if count and inject_after:
        swap = BlockSwap(blocks_of(dit), count, "cpu", slots=slots, recorder=recorder).attach()
    adapter.inject(dit)
    if count and not inject_after:
        swap = BlockSwap(blocks_of(dit), count, "cpu", slots=slots, recorder=recorder).attach()
    opt = torch.optim.AdamW(adapter.get_param_groups(0.01), lr=1e-2)
    for step in range(steps):
        latents, sigma, context, target = batch(step)
        loss = F.mse_loss(dit(latents, sigma, context), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapter.state_dict(), swap


@pytest.mark.parametrize("count, slots, inject_after", [(3, 2, False), (4, 2, False), (4, 1, False),
                                                         (4, 3, False), (3, 2, True)])
def test_training_is_bit_identical_with_block_swap(dit4, count, slots, inject_after):
    reference, _ = train_lora(copy.deepcopy(dit4), 0)
    swapped, swap = train_lora(copy.deepcopy(dit4), count, slots, inject_after=inject_after)
    assert swap.swapped == tuple(range(4 - count, 4))
    assert reference.keys() == swapped.keys()
    assert any(t.abs().sum() > 0 for k, t in swapped.items() if k.endswith("lora_up.weight"))  # it trained
    for key in reference:
        assert torch.equal(reference[key], swapped[key]), key


def test_recorder_sees_forward_then_reverse_recompute_within_slots():
    dit = tiny_dit(5)
    blocks, events = blocks_of(dit), []

    def record(event: BlockEvent) -> None:
        actual = actual_resident(blocks, range(1, 5))
        events.append(event)
        assert event.resident == actual
        assert event.index in actual
        assert len(actual) <= 2

    _, swap = train_lora(dit, 4, slots=2, steps=2, recorder=record)
    one_step = [("forward", i) for i in (1, 2, 3, 4)] + [("recompute", i) for i in (4, 3, 2, 1)]
    assert [(e.phase, e.index) for e in events] == one_step * 2
    # Lazy eviction: at the turns, the block needed next is already there.
    assert [e.resident for e in events[3:5]] == [frozenset({3, 4})] * 2
    assert events[8].resident == frozenset({1, 2})


def captured_block_call(dit, index: int):
    """The positional arguments block ``index`` receives in a no-grad forward, and its output."""
    seen = {}

    def grab(module, args, output):
        seen["args"], seen["out"] = args, output

    handle = blocks_of(dit)[index].register_forward_hook(grab)
    with torch.no_grad():
        latents, sigma, context, _ = batch(0)
        dit(latents, sigma, context)
    handle.remove()
    return seen["args"], seen["out"]


def test_a_block_run_without_its_onload_fails(dit4):
    args, expected = captured_block_call(dit4, 3)
    dit = copy.deepcopy(dit4)
    swap = BlockSwap(blocks_of(dit), 2, "cpu").attach()
    block = blocks_of(dit)[3]
    assert 3 not in swap.resident()
    with torch.no_grad(), pytest.raises(RuntimeError):
        block.forward(*args)  # .forward skips the pre-hook: the placeholders must make this fail
    with torch.no_grad():
        assert torch.equal(block(*args), expected)
    assert 3 in swap.resident()


def test_sampling_twice_and_detach_match_the_unswapped_model(dit4):
    inputs = [batch(0, 2)[:3], batch(1, 2)[:3]]
    with torch.no_grad():
        expected = [dit4(*x) for x in inputs]
    dit, events = copy.deepcopy(dit4), []
    swap = BlockSwap(blocks_of(dit), 3, "cpu", recorder=events.append).attach()
    with torch.no_grad():
        for x, want in zip(inputs, expected):
            assert torch.equal(dit(*x), want)
            # No-grad forwards wrap around: the first swapped block is prefetched for the next call.
            assert 1 in swap.resident()
    assert [(e.phase, e.index) for e in events] == [("forward", i) for i in (1, 2, 3)] * 2
    assert all(e.index in e.resident and len(e.resident) <= 2 for e in events)
    swap.detach()
    assert swap.resident() == frozenset()
    for block in blocks_of(dit):
        assert not block._forward_pre_hooks
        for tensor in [*block.parameters(), *block.buffers()]:
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()  # own storage
    for name, tensor in dit4.state_dict().items():
        assert torch.equal(dit.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(dit(*inputs[0]), expected[0])


def test_grad_without_checkpointing_is_refused(dit4):
    dit = copy.deepcopy(dit4)
    dit.set_gradient_checkpointing(False)
    LoRAAdapter(LoRAOptions(rank=4)).inject(dit)
    BlockSwap(blocks_of(dit), 3, "cpu").attach()
    latents, sigma, context, _ = batch(0)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        dit(latents, sigma, context)


class Holder(nn.Module):
    """Mixed dtypes as the fp8 base mode stores them: an fp8 weight, an fp32 scalar scale, odd-sized bf16."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(5, 3, generator=gen).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("scale_weight", torch.rand((), generator=gen))
        self.bias = nn.Parameter(torch.randn(7, generator=gen).to(torch.bfloat16), requires_grad=False)

    def forward(self, x):
        return x + self.weight.float().sum() * self.scale_weight + self.bias.float().sum()


def test_mixed_dtypes_round_trip_through_the_byte_buffers():
    modules = nn.ModuleList(Holder(seed) for seed in range(3))
    original = copy.deepcopy(modules)
    swap = BlockSwap(modules, 2, "cpu", slots=1).attach()
    assert swap.host_bytes == 2 * 3 * 256 and swap.slot_bytes == 3 * 256
    x = torch.zeros(())
    for _ in range(2):
        for module, ref in zip(modules, original):
            with torch.no_grad():
                assert torch.equal(module(x), ref(x))
            assert module.weight.dtype == torch.float8_e4m3fn and module.bias.dtype == torch.bfloat16
    assert swap.resident() == frozenset({2})
    swap.detach()
    for module, ref in zip(modules, original):
        assert torch.equal(module.weight.view(torch.uint8), ref.weight.view(torch.uint8))
        assert torch.equal(module.scale_weight, ref.scale_weight) and module.scale_weight.shape == ()
        assert torch.equal(module.bias, ref.bias)


def test_attach_block_swap_and_refusals(dit4):
    dit = copy.deepcopy(dit4)
    assert attach_block_swap(dit, 0, "cpu") is None
    with pytest.raises(ValueError, match=r"5.*4 blocks"):
        attach_block_swap(dit, 5, "cpu")
    with pytest.raises(ValueError):
        BlockSwap(blocks_of(dit), 0, "cpu")
    swap = attach_block_swap(dit, 2, "cpu")
    assert swap.swapped == (2, 3) and swap.resident() == frozenset()
    assert blocks_of(dit)[1].attn1.to_q.weight.numel() > 0 and blocks_of(dit)[3].attn1.to_q.weight.numel() == 0
    swap.detach()

    trainable = copy.deepcopy(dit4)
    weight = blocks_of(trainable)[3].attn1.to_q.weight
    weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"attn1\.to_q\.weight.*block 3.*requires grad"):
        BlockSwap(blocks_of(trainable), 2, "cpu").attach()
    assert weight.numel() > 0 and not blocks_of(trainable)[2]._forward_pre_hooks  # refused before touching anything
