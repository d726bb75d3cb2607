"""The tiny model set: official file formats, loadable by diffusers'/transformers' own classes and converters,
tokenizers with the real special-token behaviour, deterministic bytes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from anima_core.testing.tiny import (
    TEXT_ENCODER_FILE,
    TRANSFORMER_FILE,
    VAE_FILE,
    build_tiny_modules,
    tiny_configs,
    wan_vae_state_dict,
    write_tiny_model_set,
)
from anima_core.testing.tokenizers import build_qwen_tokenizer, build_t5_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def modules():
    return build_tiny_modules(0)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key


# --- DiT + LLM adapter file -------------------------------------------------------------------------------------

def test_dit_file_is_in_the_original_single_file_layout(tiny):
    with safe_open(str(tiny.transformer), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        keys = set(fh.keys())
    assert all(k.startswith("net.") for k in keys)
    assert not any(k.startswith(("net.transformer_blocks", "net.patch_embed", "net.time_embed")) for k in keys)
    for key in ("net.blocks.0.self_attn.q_proj.weight", "net.blocks.1.mlp.layer2.weight",
                "net.t_embedder.1.linear_2.weight", "net.final_layer.adaln_modulation.2.weight",
                "net.llm_adapter.embed.weight", "net.llm_adapter.blocks.1.cross_attn.k_norm.weight",
                "net.llm_adapter.out_proj.bias"):
        assert key in keys
    raw = load_file(str(tiny.transformer))
    hidden = tiny.dit_config["num_attention_heads"] * tiny.dit_config["attention_head_dim"]
    assert raw["net.x_embedder.proj.1.weight"].shape == (hidden, (16 + 1) * 2 * 2)  # 16 latent ch + mask channel
    assert raw["net.final_layer.linear.weight"].shape == (16 * 2 * 2, hidden)
    assert all(v.dtype == torch.float32 for v in raw.values())


@pytest.mark.parametrize("standard", [False, True], ids=["17-channel", "standard-anima-config"])
def test_dit_file_loads_strictly_through_diffusers_converter(tiny, modules, standard):
    from diffusers import CosmosTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    raw = load_file(str(tiny.transformer))
    dit_sd = {k: v for k, v in raw.items() if ".llm_adapter." not in k}
    config = dict(tiny.dit_config)
    if standard:  # the configuration diffusers uses for Anima: same weight shapes
        config.update(in_channels=16, concat_padding_mask=True)
    model = CosmosTransformer3DModel(**config)
    model.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(dit_sd), strict=True)
    _assert_same_tensors(model.state_dict(), modules[0].state_dict())


def test_adapter_keys_load_strictly_with_the_prefix_stripped(tiny, modules):
    from diffusers import AnimaTextConditioner

    raw = load_file(str(tiny.transformer))
    adapter_sd = {k.removeprefix("net.llm_adapter."): v for k, v in raw.items() if k.startswith("net.llm_adapter.")}
    adapter = AnimaTextConditioner(**tiny.adapter_config)
    adapter.load_state_dict(adapter_sd, strict=True)
    _assert_same_tensors(adapter.state_dict(), modules[1].state_dict())


def test_weights_are_all_distinct_so_swapped_tensors_would_show(tiny):
    raw = load_file(str(tiny.transformer))
    seen: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for key, tensor in raw.items():
        assert tensor.std() > 0, key  # nothing zero-initialised or constant
        same_shape = seen.setdefault(tuple(tensor.shape), [])
        assert not any(torch.equal(tensor, other) for other in same_shape), key
        same_shape.append(tensor)


# --- Qwen3 file --------------------------------------------------------------------------------------------------

def test_text_encoder_file_has_model_keys_and_loads_into_qwen3(tiny, modules):
    from transformers import Qwen3Config, Qwen3Model

    raw = load_file(str(tiny.text_encoder))
    assert all(k.startswith("model.") for k in raw) and "lm_head.weight" not in raw
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.q_norm.weight"} <= set(raw)
    model = Qwen3Model(Qwen3Config(**tiny.qwen_config))
    model.load_state_dict({k.removeprefix("model."): v for k, v in raw.items()}, strict=True)
    _assert_same_tensors(model.state_dict(), modules[2].state_dict())
    assert not (tiny.text_encoder.parent / "config.json").exists()  # loaders infer the config from the shapes


def test_tiny_shapes_keep_the_wiring_of_the_real_models(tiny):
    qwen, adapter, dit = tiny.qwen_config, tiny.adapter_config, tiny.dit_config
    # Qwen3-0.6B: query width 16×128 = 2048 ≠ hidden 1024
    assert qwen["num_attention_heads"] * qwen["head_dim"] != qwen["hidden_size"]
    assert adapter["source_dim"] == qwen["hidden_size"] != adapter["model_dim"]
    assert dit["text_embed_dim"] == adapter["target_dim"]
    # embedding tables larger than the tokenizers, as 151936 vs 151669 and 32128 vs 32100
    assert qwen["vocab_size"] > len(build_qwen_tokenizer())
    assert adapter["target_vocab_size"] > len(build_t5_tokenizer())
    assert tiny.vae_config["z_dim"] == 16 and dit["out_channels"] == 16 and dit["in_channels"] == 17


# --- VAE file ----------------------------------------------------------------------------------------------------

def test_vae_file_is_in_the_wan_layout(tiny):
    keys = set(load_file(str(tiny.vae)))
    for key in ("encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma",
                "encoder.downsamples.3.shortcut.weight", "encoder.downsamples.5.time_conv.weight",
                "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight",
                "conv1.weight", "conv2.bias", "decoder.conv1.weight", "decoder.middle.2.residual.6.weight",
                "decoder.upsamples.3.resample.1.weight", "decoder.upsamples.4.shortcut.weight",
                "decoder.upsamples.14.residual.3.gamma", "decoder.head.0.gamma"):
        assert key in keys, key
    diffusers_words = ("conv_in", "conv_out", "down_blocks", "up_blocks", "mid_block", "quant_conv", "resnets")
    assert not [k for k in keys if any(word in k for word in diffusers_words)]


def test_vae_round_trips_through_diffusers_wan_converter(tiny, modules):
    """The written file, converted by diffusers' own ``convert_wan_vae_to_diffusers``, loads strictly into a
    fresh ``AutoencoderKLQwenImage`` of the same config and gives back every tensor."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    converted = convert_wan_vae_to_diffusers(load_file(str(tiny.vae)))
    vae = AutoencoderKLQwenImage(**tiny.vae_config)
    vae.load_state_dict(converted, strict=True)
    _assert_same_tensors(vae.state_dict(), modules[3].state_dict())


def test_wan_layout_refuses_unknown_vae_keys(modules):
    sd = dict(modules[3].state_dict())
    sd["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="encoder.extra.weight"):
        wan_vae_state_dict(sd)


# --- tokenizers --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers(tiny):
    from transformers import AutoTokenizer

    return (AutoTokenizer.from_pretrained(str(tiny.qwen_tokenizer), local_files_only=True),
            AutoTokenizer.from_pretrained(str(tiny.t5_tokenizer), local_files_only=True))


def test_qwen_tokenizer_adds_nothing_and_pads_with_endoftext(tokenizers):
    from transformers import Qwen2Tokenizer

    qwen, _ = tokenizers
    assert isinstance(qwen, Qwen2Tokenizer)
    text = "1girl, red hair, smile"
    ids = qwen(text)["input_ids"]
    assert ids == qwen(text, add_special_tokens=False)["input_ids"]
    eot = qwen.convert_tokens_to_ids("<|endoftext|>")
    assert qwen.bos_token is None and eot not in ids
    assert qwen.pad_token == "<|endoftext|>" and qwen.pad_token_id == eot
    batch = qwen(["smile", text], padding=True)
    short = batch["input_ids"][0]
    n = len(qwen("smile")["input_ids"])
    assert short[n:] == [eot] * (len(short) - n) and batch["attention_mask"][0][n:] == [0] * (len(short) - n)


def test_qwen_tokenizer_is_byte_level_so_any_text_survives(tokenizers):
    qwen, _ = tokenizers
    for text in ("初音ミク, 1girl, ☆ smile", r"oil painting \(medium\)", "  two  spaces\nnewline"):
        assert qwen.decode(qwen(text)["input_ids"]) == text
    assert len(qwen("masterpiece, best quality")["input_ids"]) < len("masterpiece, best quality")  # merges work


def test_t5_tokenizer_appends_eos_and_uses_t5_special_ids(tokenizers):
    from transformers import T5TokenizerFast

    _, t5 = tokenizers
    assert isinstance(t5, T5TokenizerFast)
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert (t5.pad_token, t5.eos_token, t5.unk_token) == ("<pad>", "</s>", "<unk>")
    ids = t5("1girl, red hair, smile")["input_ids"]
    assert ids[-1] == 1 and 1 not in ids[:-1]
    assert t5("1girl, red hair, smile", add_special_tokens=False)["input_ids"] == ids[:-1]
    assert t5.convert_ids_to_tokens(t5("smile", add_special_tokens=False)["input_ids"]) == ["▁smile"]
    assert 2 in t5("初音")["input_ids"]  # outside the vocabulary → <unk>
    batch = t5(["smile", "red hair, smile"], padding=True)
    assert batch["input_ids"][0][2:] == [0] * (len(batch["input_ids"][0]) - 2)
    assert batch["attention_mask"][0] == [1, 1] + [0] * (len(batch["input_ids"][0]) - 2)
    assert not [tok for tok in t5.get_vocab() if tok.startswith("<extra_id_")]  # no sentinels


# --- determinism -------------------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(tiny, tmp_path):
    again = write_tiny_model_set(tmp_path / "again", seed=0)
    assert _files(tmp_path / "again") == _files(tiny.transformer.parent)
    assert again.dit_config == tiny.dit_config and again.qwen_config == tiny.qwen_config


def test_other_seed_changes_every_weight_file_but_not_the_tokenizers(tiny, tmp_path):
    other = _files(write_tiny_model_set(tmp_path / "other", seed=1).transformer.parent)
    base = _files(tiny.transformer.parent)
    for name in (TRANSFORMER_FILE, TEXT_ENCODER_FILE, VAE_FILE):
        assert other[name] != base[name]
    assert {k: v for k, v in other.items() if "tokenizer" in k} == {k: v for k, v in base.items() if "tokenizer" in k}


@pytest.mark.slow
def test_files_are_identical_across_processes_with_other_hash_seeds(tiny, tmp_path):
    script = textwrap.dedent(f"""
        from anima_core.testing.tiny import write_tiny_model_set
        write_tiny_model_set(__import__("pathlib").Path({str(tmp_path / "child")!r}), seed=0)
    """)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    assert _files(tmp_path / "child") == _files(tiny.transformer.parent)


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_modules(0)
    assert torch.equal(torch.rand(3), expected)


def test_configs_are_fresh_copies():
    a = tiny_configs()
    a["vae"]["dim_mult"].append(8)
    a["dit"]["num_layers"] = 99
    b = tiny_configs()
    assert b["vae"]["dim_mult"] == [1, 2, 4, 4] and b["dit"]["num_layers"] == 2
