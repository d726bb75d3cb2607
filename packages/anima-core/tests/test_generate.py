"""Generation on the tiny model set: the API and the ``anima generate`` command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from anima_core.model.models import AnimaModels, GenerationParams
from anima_core.testing.tiny import write_tiny_model_set


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def lora_files(tiny, tmp_path_factory):
    """A LoRA with zero lora_up (a fresh adapter) and one with trained-looking non-zero weights."""
    from anima_core.builtins.adapters import LoRAOptions
    from anima_core.lora import LoRAAdapter
    from anima_core.model.dit import load_transformer

    folder = tmp_path_factory.mktemp("loras")
    adapter = LoRAAdapter(LoRAOptions(rank=4, alpha=4.0))
    adapter.inject(load_transformer(tiny.transformer))
    adapter.save(folder / "zero.safetensors")
    with torch.no_grad():
        for mod in adapter.network.loras.values():
            mod.lora_up.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    adapter.save(folder / "nonzero.safetensors")
    return folder / "zero.safetensors", folder / "nonzero.safetensors"


def _load(tiny):
    return AnimaModels.load(tiny.transformer, tiny.text_encoder, tiny.vae, tiny.qwen_tokenizer, tiny.t5_tokenizer)


def _pixels(image):
    return np.asarray(image)


def test_same_seed_same_image_and_lora_effects(tiny, lora_files):
    params = GenerationParams(prompt="1girl, smile", width=64, height=48, steps=4, seed=3)
    models = _load(tiny)
    first = models.generate(params)
    assert first.size == (64, 48)
    assert np.array_equal(_pixels(first), _pixels(models.generate(params)))
    assert not np.array_equal(_pixels(first), _pixels(models.generate(GenerationParams(**{**params.__dict__,
                                                                                          "seed": 4}))))
    zero, nonzero = lora_files
    applied = models.apply_lora(zero, 1.0)
    assert np.array_equal(_pixels(models.generate(params)), _pixels(first))
    applied.remove()
    models.apply_lora(nonzero, 1.0)
    assert not np.array_equal(_pixels(models.generate(params)), _pixels(first))


def test_euler_and_cfg_one_paths(tiny):
    models = _load(tiny)
    params = GenerationParams(prompt="smile", width=32, height=32, steps=3, cfg=1.0, sampler="euler")
    a, b = models.generate(params), models.generate(params)
    assert np.array_equal(_pixels(a), _pixels(b))


def test_generate_command_writes_a_png_with_its_parameters(tiny, lora_files, tmp_path, anima):
    out = tmp_path / "out.png"
    _, nonzero = lora_files
    result = anima("generate", "--prompt", "(red hair:1.2), smile", "--negative-prompt", "lowres",
                   "--transformer", tiny.transformer, "--text-encoder", tiny.text_encoder, "--vae", tiny.vae,
                   "--qwen-tokenizer", tiny.qwen_tokenizer, "--t5-tokenizer", tiny.t5_tokenizer,
                   "--lora", f"{nonzero}:0.5", "--width", "48", "--height", "32", "--steps", "3", "--seed", "11",
                   "--device", "cpu", "-o", out, timeout=300)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (48, 32)
    meta = json.loads(image.text["anima"])
    assert meta["prompt"] == "(red hair:1.2), smile" and meta["seed"] == 11 and meta["steps"] == 3
    assert meta["loras"] == [[str(nonzero), 0.5]]
    assert "Negative prompt: lowres" in image.text["parameters"]


def test_generate_command_reports_missing_inputs_clearly(tiny, tmp_path, anima):
    result = anima("generate", "--prompt", "x", "--transformer", tiny.transformer, "--text-encoder",
                   tiny.text_encoder, "--vae", tiny.vae, "--t5-tokenizer", tiny.t5_tokenizer, "-o",
                   tmp_path / "x.png", timeout=300)
    assert result.returncode == 2
    assert "model.qwen_tokenizer is not set" in result.stderr and "Traceback" not in result.stderr
    bad = anima("generate", "--prompt", "x", "--width", "50", "-o", tmp_path / "y.png")
    assert bad.returncode == 2 and "multiples of 16" in bad.stderr


def test_files_core_cannot_read_go_to_the_adapter_that_can(tiny, tmp_path, host_with):
    from fake_plugins import FileDeltaAdapterPlugin
    from safetensors.torch import save_file

    from anima_core.errors import UserError

    models = _load(tiny)
    params = GenerationParams(prompt="1girl", width=32, height=32, steps=2, seed=1)
    plain = models.generate(params)
    q = models.dit.get_submodule("transformer.transformer_blocks.0.attn1.to_q")
    before = q.weight.detach().clone()
    delta = torch.randn(before.shape, generator=torch.Generator().manual_seed(0))
    save_file({"blocks.0.self_attn.q_proj.fake_delta": delta}, str(tmp_path / "fake.safetensors"))
    save_file({"blocks.0.self_attn.q_proj.fake_delta": delta}, str(tmp_path / "named.safetensors"),
              metadata={"anima_adapter": "fake_double"})

    host_with()  # core alone: nothing reads the format, one clear message
    with pytest.raises(UserError, match=r"not a LoRA file anima can apply .*adapters that read other formats: none"):
        models.apply_lora(tmp_path / "fake.safetensors")
    assert torch.equal(q.weight, before)

    host_with(("file_deltas", FileDeltaAdapterPlugin()))
    applied = models.apply_lora(tmp_path / "fake.safetensors", 0.5)  # first reader in name order: fake_delta
    torch.testing.assert_close(q.weight, before + 0.5 * delta)
    assert not np.array_equal(_pixels(models.generate(params)), _pixels(plain))
    applied.remove()
    torch.testing.assert_close(q.weight, before)
    models.apply_lora(tmp_path / "named.safetensors", 1.0)  # the file's metadata names its reader
    torch.testing.assert_close(q.weight, before + 2.0 * delta)


def test_modules_that_match_nothing_are_listed_and_warned_about_once(tiny, lora_files, tmp_path, capsys, anima):
    from safetensors.torch import load_file, save_file

    _, nonzero = lora_files
    tensors = load_file(str(nonzero))
    extra = ["lora_unet_blocks_7_self_attn_q_proj", "lora_unet_blocks_8_mlp_layer1", "lora_unet_final_layer_x",
             "lora_unet_no_such_module"]
    for name in extra:
        tensors[f"{name}.lora_down.weight"] = torch.zeros(4, 8)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(8, 4)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "partly.safetensors"
    save_file(tensors, str(path))
    applied = _load(tiny).apply_lora(path, 1.0)
    assert applied.skipped == sorted(extra)
    assert len(applied.deltas) == len(tensors) // 3 - len(extra)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert f"4 of its {len(tensors) // 3} modules match nothing" in err and ", ..." in err
    assert all(name in err for name in sorted(extra)[:3])
    assert _load(tiny).apply_lora(nonzero, 1.0).skipped == []  # a file that matches fully: no warning
    assert "warning" not in capsys.readouterr().err
    result = anima("generate", "--prompt", "x", "--transformer", tiny.transformer, "--text-encoder",
                   tiny.text_encoder, "--vae", tiny.vae, "--qwen-tokenizer", tiny.qwen_tokenizer, "--t5-tokenizer",
                   tiny.t5_tokenizer, "--lora", path, "--width", "32", "--height", "32", "--steps", "1",
                   "--device", "cpu", "-o", tmp_path / "x.png", timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("match nothing in this model") == 1
