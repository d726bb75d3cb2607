"""The name map between diffusers' Anima modules and the original checkpoint, proved on every parameter of a tiny
and of a full-size (meta-device) model, both ways and against diffusers' own single-file converter."""

import re

import pytest
import torch
from torch import nn

from anima_core.model.names import (
    adapter_to_original,
    comfy_lora_name,
    dit_to_original,
    original_anima_state_dict,
    original_dit_state_dict,
    original_path_from_comfy_lora_name,
    original_to_adapter,
    original_to_dit,
)
from anima_core.testing.tiny import build_tiny_modules

# The original layout as documented from the loaders of sd-scripts, ComfyUI and diffusion-pipe (independent of the
# diffusers rename table that names.py restates).
ORIGINAL_DIT_KEY = re.compile(
    r"x_embedder\.proj\.1\.weight|t_embedder\.1\.linear_[12]\.weight|t_embedding_norm\.weight"
    r"|blocks\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|output_proj|q_norm|k_norm)\.weight"
    r"|blocks\.\d+\.mlp\.layer[12]\.weight|blocks\.\d+\.adaln_modulation_(self_attn|cross_attn|mlp)\.[12]\.weight"
    r"|final_layer\.linear\.weight|final_layer\.adaln_modulation\.[12]\.weight")


@pytest.fixture(scope="module")
def tiny():
    dit, adapter, _, _ = build_tiny_modules(0)
    return dit, adapter


@pytest.fixture(scope="module")
def full_size():
    """The Anima configuration on the meta device: 28 blocks (two-digit indices), no memory used."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    with torch.device("meta"):
        dit = CosmosTransformer3DModel(in_channels=17, num_attention_heads=16, attention_head_dim=128,
                                       num_layers=28, text_embed_dim=1024, adaln_lora_dim=256,
                                       rope_scale=(1.0, 4.0, 4.0), extra_pos_embed_type=None,
                                       concat_padding_mask=False)
        adapter = AnimaTextConditioner()
    return dit, adapter


@pytest.fixture(params=["tiny", "full_size"])
def models(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("diffusers_name, original_name", [
    ("transformer_blocks.0.attn1.to_q", "blocks.0.self_attn.q_proj"),
    ("transformer_blocks.0.attn1.to_q.weight", "blocks.0.self_attn.q_proj.weight"),
    ("transformer_blocks.1.attn2.to_out.0.weight", "blocks.1.cross_attn.output_proj.weight"),
    ("transformer_blocks.0.attn1.norm_k.weight", "blocks.0.self_attn.k_norm.weight"),
    ("transformer_blocks.27.ff.net.0.proj.weight", "blocks.27.mlp.layer1.weight"),
    ("transformer_blocks.27.ff.net.2", "blocks.27.mlp.layer2"),
    ("transformer_blocks.3.norm1.linear_1.weight", "blocks.3.adaln_modulation_self_attn.1.weight"),
    ("transformer_blocks.3.norm2.linear_2.weight", "blocks.3.adaln_modulation_cross_attn.2.weight"),
    ("transformer_blocks.3.norm3.linear_2", "blocks.3.adaln_modulation_mlp.2"),
    ("patch_embed.proj.weight", "x_embedder.proj.1.weight"),
    ("time_embed.t_embedder.linear_1.weight", "t_embedder.1.linear_1.weight"),
    ("time_embed.t_embedder.linear_2", "t_embedder.1.linear_2"),
    ("time_embed.norm.weight", "t_embedding_norm.weight"),
    ("norm_out.linear_1.weight", "final_layer.adaln_modulation.1.weight"),
    ("norm_out.linear_2.weight", "final_layer.adaln_modulation.2.weight"),
    ("proj_out.weight", "final_layer.linear.weight"),
    ("transformer_blocks.12", "blocks.12"),
    ("transformer_blocks.12.attn2", "blocks.12.cross_attn"),
    ("transformer_blocks.12.ff", "blocks.12.mlp"),
])
def test_documented_renames_both_ways(diffusers_name, original_name):
    assert dit_to_original(diffusers_name) == original_name
    assert original_to_dit(original_name) == diffusers_name


def test_every_dit_parameter_round_trips_and_has_a_documented_original_name(models):
    dit, _ = models
    names = [name for name, _ in dit.named_parameters()]
    originals = [dit_to_original(name) for name in names]
    assert len(set(originals)) == len(names)
    for name, original in zip(names, originals):
        assert ORIGINAL_DIT_KEY.fullmatch(original), original
        assert original_to_dit(original) == name


def test_full_size_dit_has_the_567_tensors_of_the_released_files(full_size):
    dit, adapter = full_size
    assert len(original_dit_state_dict(dit.state_dict())) == 567
    assert len(adapter.state_dict()) == 118


def test_every_dit_module_path_round_trips(models):
    dit, _ = models
    for path, _ in dit.named_modules():
        if path:
            assert original_to_dit(dit_to_original(path)) == path


def test_original_layout_goes_back_through_diffusers_converter_exactly(models):
    """diffusers' own single-file converter (the Cosmos 2.0 path) must turn our original layout back into the
    diffusers keys, each with the very same tensor."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    dit, _ = models
    sd = dit.state_dict()
    written = {"net." + k: v for k, v in original_dit_state_dict(sd).items()}
    assert all(not k.startswith("net.transformer_blocks") for k in written)
    converted = convert_cosmos_transformer_checkpoint_to_diffusers(dict(written))
    assert set(converted) == set(sd)
    assert all(converted[k] is sd[k] for k in sd)


def test_linear_module_paths_agree_with_the_converter(tiny):
    """Module paths (what LoRA files are keyed by) map like the parameter names do in diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    dit, _ = tiny
    linears = [path for path, mod in dit.named_modules() if isinstance(mod, nn.Linear)]
    probe = {"net." + dit_to_original(path) + ".weight": path for path in linears}
    converted = convert_cosmos_transformer_checkpoint_to_diffusers(dict(probe))
    assert converted == {path + ".weight": path for path in linears}


def test_unknown_segments_pass_through_so_broken_files_still_get_readable_names():
    assert dit_to_original("transformer_blocks.0.attn1.extra_proj.weight") == "blocks.0.self_attn.extra_proj.weight"
    assert original_to_dit("blocks.0.self_attn.extra_proj.weight") == "transformer_blocks.0.attn1.extra_proj.weight"
    assert dit_to_original("rope") == "rope"


def test_original_dit_state_dict_refuses_colliding_names():
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="blocks.0.x"):
        original_dit_state_dict({"transformer_blocks.0.x": t, "blocks.0.x": t})


def test_every_adapter_parameter_keeps_its_name_under_llm_adapter(models):
    _, adapter = models
    for name, _ in adapter.named_parameters():
        original = adapter_to_original(name)
        assert original == "llm_adapter." + name
        assert original_to_adapter(original) == name
        assert original_to_adapter("net." + original) == name
        assert original_to_adapter("diffusion_model." + original) == name


@pytest.mark.parametrize("bad", ["blocks.0.self_attn.q_proj", "my_llm_adapter.embed.weight", "llm_adapterx.embed"])
def test_original_to_adapter_rejects_non_adapter_names(bad):
    with pytest.raises(KeyError):
        original_to_adapter(bad)


def test_dit_map_refuses_adapter_names_instead_of_mangling_them():
    with pytest.raises(KeyError, match="original_to_adapter"):
        original_to_dit("llm_adapter.blocks.0.self_attn.q_proj.weight")
    with pytest.raises(KeyError, match="adapter_to_original"):
        dit_to_original("llm_adapter.blocks.0.self_attn.q_proj")


def test_single_file_layout_of_dit_and_adapter(tiny):
    dit, adapter = tiny
    sd = original_anima_state_dict(dit.state_dict(), adapter.state_dict())
    assert len(sd) == len(dit.state_dict()) + len(adapter.state_dict())
    assert all(k.startswith("net.") for k in sd)
    q_proj = adapter.blocks[0].cross_attn.q_proj.weight
    assert torch.equal(sd["net.llm_adapter.blocks.0.cross_attn.q_proj.weight"], q_proj)
    assert torch.equal(sd["net.blocks.1.self_attn.q_proj.weight"], dit.transformer_blocks[1].attn1.to_q.weight)
    assert not torch.equal(sd["net.blocks.1.self_attn.q_proj.weight"], dit.transformer_blocks[1].attn1.to_k.weight)


def _linear_original_paths(dit: nn.Module, adapter: nn.Module) -> list[str]:
    paths = [dit_to_original(p) for p, m in dit.named_modules() if isinstance(m, nn.Linear)]
    return paths + [adapter_to_original(p) for p, m in adapter.named_modules() if isinstance(m, nn.Linear)]


def test_comfy_lora_names_of_every_linear_are_unique_and_resolve_back(models):
    paths = _linear_original_paths(*models)
    names = [comfy_lora_name(p) for p in paths]
    assert len(set(names)) == len(paths)
    known = set(paths)
    for path, name in zip(paths, names):
        assert name == "lora_unet_" + path.replace(".", "_")
        assert original_path_from_comfy_lora_name(name, known) == path


def test_full_size_linear_counts(full_size):
    paths = _linear_original_paths(*full_size)
    # sd-scripts' default targets: q/k/v/output_proj of both attentions + mlp.layer1/2 in every block = 280
    block_targets = [p for p in paths if re.fullmatch(r"blocks\.\d+\.(self_attn|cross_attn|mlp)\.\w+", p)]
    assert len(block_targets) == 280
    # sd-scripts' train_llm_adapter targets the 60 Linears of the adapter's 6 blocks (out_proj is outside them)
    assert len([p for p in paths if p.startswith("llm_adapter.blocks.")]) == 60


def test_comfy_examples_from_comfyui_and_sd_scripts():
    known = ["blocks.0.self_attn.q_proj", "llm_adapter.blocks.0.cross_attn.k_proj", "final_layer.linear"]
    assert comfy_lora_name("blocks.0.self_attn.q_proj") == "lora_unet_blocks_0_self_attn_q_proj"
    assert original_path_from_comfy_lora_name("lora_unet_llm_adapter_blocks_0_cross_attn_k_proj", known) == \
        "llm_adapter.blocks.0.cross_attn.k_proj"
    assert original_path_from_comfy_lora_name("lora_unet_blocks_1_self_attn_q_proj", known) is None
    assert original_path_from_comfy_lora_name("lora_te_layers_0_self_attn_q_proj", known) is None
    assert original_path_from_comfy_lora_name("blocks_0_self_attn_q_proj", known) is None


def test_ambiguous_comfy_name_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="ambiguous"):
        original_path_from_comfy_lora_name("lora_unet_a_b_c", ["a.b_c", "a_b.c"])
