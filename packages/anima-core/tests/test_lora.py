"""Core's LoRA: module selection, per-module rank, scaling, file keys and metadata."""

import math

import torch
from safetensors import safe_open
from torch import nn

from anima_core.builtins.adapters import LoRAOptions
from anima_core.lora import LoRAAdapter


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(8, 8, bias=False)
        self.attn1.to_out = nn.ModuleList([nn.Linear(8, 8)])
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(16, 8)])
        self.ff.net[0].proj = nn.Linear(8, 16)
        self.norm1 = nn.Module()
        self.norm1.linear_1 = nn.Linear(8, 8)

    def forward(self, x):
        h = x + self.attn1.to_out[0](self.attn1.to_q(x))
        return h + self.ff.net[2](torch.relu(self.ff.net[0].proj(h))) + self.norm1.linear_1(h)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.transformer_blocks:
            x = b(x)
        return x


def test_default_targets_take_attention_and_mlp_but_not_adaln():
    adapter = LoRAAdapter(LoRAOptions())
    adapter.inject(Tiny())
    keys = sorted(adapter.network.loras.keys())
    assert keys == sorted(f"lora_unet_transformer_blocks_{i}_{m}" for i in (0, 1)
                          for m in ("attn1_to_q", "attn1_to_out_0", "ff_net_0_proj", "ff_net_2"))


def test_rank_by_regex_alpha_and_rs_scaling(tmp_path):
    opts = LoRAOptions(rank=4, alpha=2.0, rs_lora=True, rank_by_regex={r".*ff\.net\.2": 2})
    adapter = LoRAAdapter(opts)
    adapter.inject(Tiny())
    q = adapter.network.loras["lora_unet_transformer_blocks_0_attn1_to_q"]
    ff = adapter.network.loras["lora_unet_transformer_blocks_1_ff_net_2"]
    assert q.lora_down.weight.shape == (4, 8) and ff.lora_down.weight.shape == (2, 16)
    # rs: scale = alpha / sqrt(rank); the saved alpha makes ComfyUI's alpha/rank equal that scale
    assert math.isclose(q.scale, 2.0 / math.sqrt(4), rel_tol=1e-6)
    assert math.isclose(ff.scale, 2.0 / math.sqrt(2), rel_tol=1e-6)
    path = tmp_path / "lora.safetensors"
    adapter.save(path, {"ss_steps": "3"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        saved_alpha = f.get_tensor("lora_unet_transformer_blocks_1_ff_net_2.alpha")
    assert math.isclose(float(saved_alpha) / 2, 2.0 / math.sqrt(2), rel_tol=1e-6)
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "3"
    assert "lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert len(keys) == 8 * 3


def test_base_state_dict_keys_are_untouched_by_injection():
    model = Tiny()
    before = set(model.state_dict())
    LoRAAdapter(LoRAOptions()).inject(model)
    assert set(model.state_dict()) == before


def test_multiplier_scales_the_delta():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(3, 8)
    base = model(x)
    adapter = LoRAAdapter(LoRAOptions(rank=2, alpha=2.0))
    adapter.inject(model)
    with torch.no_grad():
        for mod in adapter.network.loras.values():
            mod.lora_up.weight.normal_()
        full = model(x)
        adapter.set_multiplier(0.0)
        assert torch.allclose(model(x), base)
        adapter.set_multiplier(1.0)
        assert not torch.allclose(full, base)


def test_alpha_is_saved_in_fp32_whatever_the_save_dtype(tmp_path):
    """rs-LoRA rank 8, alpha 4 stores alpha 4·√8 = 11.3137; in bf16 it would be 11.3125 and shift ComfyUI's
    alpha.item() / rank scale. Weights take the save dtype, alpha stays fp32 (as lycoris stores it)."""
    from anima_core.model.lora_files import lora_deltas

    adapter = LoRAAdapter(LoRAOptions(rank=8, alpha=4.0, rs_lora=True, targets=[r".*attn1\.to_q"]))
    model = Tiny()
    adapter.inject(model)
    with torch.no_grad():
        for mod in adapter.network.loras.values():
            mod.lora_up.weight.normal_()
    path = tmp_path / "rs.safetensors"
    adapter.save(path, {}, dtype=torch.bfloat16)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "lora_unet_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{key}.alpha"].dtype == torch.float32
    assert tensors[f"{key}.alpha"].item() == torch.tensor(4.0 * math.sqrt(8)).item()  # exactly the fp32 value
    assert tensors[f"{key}.lora_down.weight"].dtype == torch.bfloat16
    # what ComfyUI (and anima generate --lora) computes from it: alpha.item() / rank = 4 / √8
    path_of = {"transformer_blocks.0.attn1.to_q": "transformer_blocks.0.attn1.to_q"}
    delta = lora_deltas(tensors, path_of, str(path))["transformer_blocks.0.attn1.to_q"]
    up, down = tensors[f"{key}.lora_up.weight"].float(), tensors[f"{key}.lora_down.weight"].float()
    torch.testing.assert_close(delta, up @ down * (4.0 / math.sqrt(8)))
