"""The low-VRAM modes through the real training runtime (CPU, fp32, tiny model): fp8 base, compiled blocks, block
swap, and where the VAE and text encoder live after caching."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from anima_core.testing.datasets import write_shapes_dataset
from anima_core.testing.tiny import write_tiny_model_set
from anima_core.testing.training import tiny_train_config as config
from anima_core.training.api import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=4)


def losses(out):
    return [entry["loss"] for entry in json.loads((out / "monitor_state.json").read_text())["losses"]]


def adapter_tensors(state_dir):
    return load_file(str(state_dir / "adapter.safetensors"))


def test_a_lora_trained_on_an_fp8_base_has_the_same_keys_and_dtypes(tiny, images, tmp_path):
    plain = train(config(tiny, images, tmp_path / "a", train={"max_steps": 2}))
    quant = train(config(tiny, images, tmp_path / "b", train={"max_steps": 2}, model={"base_precision": "fp8"}))
    with safe_open(str(plain.lora), "pt") as a, safe_open(str(quant.lora), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert a.get_tensor(key).dtype == b.get_tensor(key).dtype, key
            assert a.get_tensor(key).shape == b.get_tensor(key).shape, key
    a_losses, b_losses = losses(tmp_path / "a"), losses(tmp_path / "b")
    # The first step's loss is the untrained LoRA on each base. Stated tolerance 5 %: one micro-batch of a tiny random
    # model whose few weights per tensor make the e4m3 rounding error average out less than on the real model
    # (test_fp8 holds 1 % on fixed inputs; bench/fp8_error.py measures the full-size block Linears).
    assert b_losses[0] == pytest.approx(a_losses[0], rel=0.05)
    assert b_losses[0] != a_losses[0]  # the fp8 base really was used
    state_a, state_b = adapter_tensors(plain.state), adapter_tensors(quant.state)
    assert {k: v.dtype for k, v in state_a.items()} == {k: v.dtype for k, v in state_b.items()}


def test_resume_on_an_fp8_base_is_bit_exact(tiny, images, tmp_path):
    base = dict(train={"max_steps": 4}, model={"base_precision": "fp8"},
                output={"save_state_every_n_steps": 2, "keep_states": 0})
    full = train(config(tiny, images, tmp_path / "a", **base))
    first = sorted((tmp_path / "a" / "state").iterdir())[0]
    resumed = train(config(tiny, images, tmp_path / "b", **base), resume=first)
    a, b = adapter_tensors(full.state), adapter_tensors(resumed.state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_blocks_train_like_eager(tiny, images, tmp_path):
    eager = train(config(tiny, images, tmp_path / "a", train={"max_steps": 2}))
    compiled = train(config(tiny, images, tmp_path / "b", train={"max_steps": 2, "compile": True}))
    # Stated tolerance: inductor reorders float32 reductions, so losses agree to ~1e-6 relative, not bit for bit.
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-4)
    a, b = adapter_tensors(eager.state), adapter_tensors(compiled.state)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


def test_block_swap_trains_bit_identically(tiny, images, tmp_path):
    # block swap needs gradient checkpointing: the reference run checkpoints too (its recompute is what swap re-loads)
    plain = train(config(tiny, images, tmp_path / "a", train={"max_steps": 3}, model={"gradient_checkpointing": True}))
    swapped = train(config(tiny, images, tmp_path / "b", train={"max_steps": 3},
                           model={"blocks_to_swap": 2, "gradient_checkpointing": True},
                           sample={"prompts": ["a red circle"], "every_n_steps": 3, "steps": 2}))
    a, b = adapter_tensors(plain.state), adapter_tensors(swapped.state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "samples" / "step000003_0.png").exists()  # sampling runs through the swap


def test_text_encoder_is_freed_after_caching_when_nothing_needs_it(tiny, images, tmp_path, monkeypatch):
    from anima_core.training import residency

    seen = {}
    original = residency.after_caching

    def spy(ctx):
        original(ctx)
        seen["qwen"] = ctx.models.text.qwen
        seen["vae_device"] = next(ctx.models.vae.parameters()).device

    monkeypatch.setattr(residency, "after_caching", spy)
    result = train(config(tiny, images, tmp_path / "a", train={"max_steps": 1},
                          dataset={"cache_text_encoder": True}))
    assert result.steps == 1 and seen["qwen"] is None and seen["vae_device"] == torch.device("cpu")
    seen.clear()
    train(config(tiny, images, tmp_path / "b", train={"max_steps": 1}, dataset={"cache_text_encoder": True},
                 sample={"prompts": ["a red circle"], "every_n_steps": 1, "steps": 2}))
    assert seen["qwen"] is not None  # previews still encode their prompts
    assert (tmp_path / "b" / "samples" / "step000001_0.png").exists()


@pytest.mark.parametrize("model, message", [
    ({"blocks_to_swap": 1, "gradient_checkpointing": False}, "needs gradient_checkpointing"),
    ({"blocks_to_swap": 3, "gradient_checkpointing": True}, "more than the 2 blocks"),
    ({"base_precision": "fp4"}, "model.base_precision"),
])
def test_bad_low_vram_settings_are_one_clear_error(tiny, images, tmp_path, write_yaml, anima, model, message):
    import yaml

    cfg = config(tiny, images, tmp_path / "out", train={"max_steps": 1}, model=model)
    result = anima("train", write_yaml(yaml.safe_dump(json.loads(json.dumps(cfg, default=str)))))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
