"""End to end on the tiny model set: training lowers the loss, resume is bit-exact, and ``anima generate --lora``
applies our files the way merging ComfyUI's ΔW does."""

import json

import numpy as np
import pytest
import torch
from comfy_rules import comfy_delta, comfy_key_map
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anima_core.testing.training import fixed_eval_loss, tiny_train_config
from anima_core.training.api import train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("adapter", [
    {"type": "lokr", "rank": 4, "alpha": 4.0},
    {"type": "loha", "rank": 4, "alpha": 4.0},
    {"type": "locon", "rank": 4, "alpha": 4.0, "train_llm_adapter": True},
], ids=lambda a: a["type"])
def test_a_tiny_training_run_lowers_the_loss(tiny, images, tmp_path, adapter):
    before = fixed_eval_loss(tiny, images)
    result = train(tiny_train_config(tiny, images, tmp_path / "out", adapter=adapter,
                                     optimizer={"type": "adamw", "lr": 5e-3},
                                     train={"max_steps": 10, "batch_size": 4},
                                     timestep_sampler={"type": "uniform"}))
    # fixed_eval_loss merges the saved file through core's registry lookup, i.e. this plugin's file_deltas.
    assert fixed_eval_loss(tiny, images, result.lora) < 0.9 * before
    with safe_open(str(result.lora), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == adapter["type"] and args["rank"] == 4  # lycoris' args and core's options, both
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["anima_adapter"] == adapter["type"]
    assert meta["modelspec.architecture"] == f"anima/{adapter['type']}"
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_unet_llm_adapter_") for k in keys) == adapter.get("train_llm_adapter", False)


@pytest.mark.parametrize("adapter", [
    {"type": "lokr", "rank": 2, "dora": True, "rank_dropout": 0.2, "module_dropout": 0.2},
    {"type": "locon", "rank": 4, "dropout": 0.2, "rank_dropout": 0.2, "train_llm_adapter": True,
     "llm_adapter_lr": 1e-3},
], ids=lambda a: a["type"])
def test_resume_is_bit_exact(tiny, images, tmp_path, adapter):
    sections = dict(adapter=adapter, optimizer={"type": "adamw", "lr": 2e-3, "weight_decay": 0.01},
                    train={"max_steps": 4, "batch_size": 1, "grad_accum": 2},
                    output={"save_state_every_n_steps": 2, "keep_states": 0})
    full = train(tiny_train_config(tiny, images, tmp_path / "a", **sections))
    resumed = train(tiny_train_config(tiny, images, tmp_path / "b", **sections),
                    resume=tmp_path / "a" / "state" / "step_00000002")
    assert resumed.steps == full.steps == 4
    a, b = load_file(str(full.state / "adapter.safetensors")), load_file(str(resumed.state / "adapter.safetensors"))
    start = load_file(str(tmp_path / "a" / "state" / "step_00000002" / "adapter.safetensors"))
    assert a.keys() == b.keys() and a
    assert any(not torch.equal(a[k], start[k]) for k in a)  # steps 3-4 trained something
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def lokr_files(tiny, tmp_path_factory):
    """A trained-looking LoKr file (full and decomposed w2, DiT + LLM adapter) and the same ΔW as plain LoRA:
    ``lora_up`` = ComfyUI's ΔW, ``lora_down`` = identity, no alpha (scale 1)."""
    from anima_core.model.dit import load_transformer
    from anima_core.plugin_host import make_host

    folder = tmp_path_factory.mktemp("lokr")
    model = load_transformer(tiny.transformer).requires_grad_(False)
    spec = make_host(strict=True).registry.spec("adapter", "lokr")
    adapter = spec.build(spec.options.model_validate({"type": "lokr", "rank": 4, "alpha": 2.0,
                                                      "train_llm_adapter": True}))
    adapter.inject(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter.network.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    adapter.save(folder / "lokr.safetensors")
    with safe_open(str(tiny.transformer), "pt") as f:
        checkpoint = {k: f.get_tensor(k) for k in f.keys()}
    names = comfy_key_map(checkpoint)
    plain = {}
    with safe_open(str(folder / "lokr.safetensors"), "pt") as f:
        groups = {}
        for key in f.keys():
            module, _, suffix = key.partition(".")
            groups.setdefault(module, {})[suffix] = f.get_tensor(key)
    for module, parts in groups.items():
        weight = checkpoint[f"net.{names[module]}.weight"]
        delta = comfy_delta(parts, weight).float()
        plain[f"{module}.lora_up.weight"] = delta.contiguous()
        plain[f"{module}.lora_down.weight"] = torch.eye(weight.shape[1])
    save_file(plain, str(folder / "plain.safetensors"))
    return folder / "lokr.safetensors", folder / "plain.safetensors"


def test_generate_applies_a_lokr_file_as_merging_comfyuis_delta(tiny, lokr_files, tmp_path, anima):
    lokr, plain = lokr_files

    def generate(name, *extra):
        out = tmp_path / f"{name}.png"
        result = anima("generate", "--prompt", "1girl, smile", "--transformer", tiny.transformer, "--text-encoder",
                       tiny.text_encoder, "--vae", tiny.vae, "--qwen-tokenizer", tiny.qwen_tokenizer,
                       "--t5-tokenizer", tiny.t5_tokenizer, "--width", "64", "--height", "64", "--steps", "3",
                       "--seed", "5", "--device", "cpu", "-o", out, *extra)
        assert result.returncode == 0, result.stderr
        return np.asarray(Image.open(out)).astype(int)

    base, with_lokr, with_delta = generate("base"), generate("lokr", "--lora", lokr), generate("plain", "--lora", plain)
    assert np.abs(with_lokr - base).mean() > 2.0  # the LoKr changes the picture
    # ... exactly as the plain ΔW does (fp32 rounding may move a pixel value by one)
    assert np.abs(with_lokr - with_delta).max() <= 1


def test_generate_refuses_a_lycoris_file_for_another_model_in_one_message(tiny, tmp_path, anima):
    save_file({"lora_unet_not_a_module.lokr_w1": torch.ones(2, 2), "lora_unet_not_a_module.lokr_w2": torch.ones(2, 2)},
              str(tmp_path / "other.safetensors"))
    result = anima("generate", "--prompt", "x", "--transformer", tiny.transformer, "--text-encoder",
                   tiny.text_encoder, "--vae", tiny.vae, "--qwen-tokenizer", tiny.qwen_tokenizer, "--t5-tokenizer",
                   tiny.t5_tokenizer, "--width", "32", "--height", "32", "--steps", "1", "--device", "cpu",
                   "--lora", tmp_path / "other.safetensors", "-o", tmp_path / "x.png")
    assert result.returncode == 2, result.stderr
    assert "none of its modules match" in result.stderr and "Traceback" not in result.stderr
