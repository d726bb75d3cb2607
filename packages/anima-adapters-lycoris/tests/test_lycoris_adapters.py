"""lokr / loha / locon on their own and on the tiny Anima DiT: conformance, ComfyUI key names and ΔW, merge,
settings isolation, weight-decay and lr groups, validation."""

import copy

import pytest
import torch
from comfy_rules import comfy_delta, comfy_key_map
from safetensors import safe_open

from anima_core.builtins.adapters import LoRAOptions
from anima_core.config.loading import ConfigError, validate_config
from anima_core.lora import select_linears
from anima_core.testing import AdapterConformance, installed_registry


class TestLoKr(AdapterConformance):
    name = "lokr"
    options = {"targets": [".*"], "rank": 2, "alpha": 2.0, "factor": 4}


class TestLoKrFullMatrixDoRA(AdapterConformance):
    name = "lokr"
    options = {"targets": [".*"], "full_matrix": True, "dora": True, "rs_lora": True}


class TestLoHa(AdapterConformance):
    name = "loha"
    options = {"targets": [".*"], "rank": 4, "alpha": 2.0}


class TestLoHaDoRA(AdapterConformance):
    name = "loha"
    options = {"targets": [".*"], "rank": 2, "dora": True}


class TestLoCon(AdapterConformance):
    name = "locon"
    options = {"targets": [".*"], "rank": 4, "alpha": 8.0}


class TestLoConDoRARankByRegex(AdapterConformance):
    name = "locon"
    options = {"targets": [".*"], "rank": 4, "dora": True, "rs_lora": True, "rank_by_regex": {"hidden": 2}}


# Every variant and mode whose file ComfyUI must read as we train it. On the tiny DiT (width 64, MLP 256) LoKr rank 4
# with factor 8 gives full lokr_w2 on the 64×64 layers and a decomposed one on the MLP: both kinds in one file.
CASES = {
    "lokr": {"type": "lokr", "rank": 4, "alpha": 2.0},
    "lokr_decompose_both_balanced": {"type": "lokr", "rank": 2, "alpha": 3.0, "factor": -1, "decompose_both": True},
    "lokr_full_matrix_rs": {"type": "lokr", "rank": 8, "alpha": 2.0, "full_matrix": True, "rs_lora": True},
    "lokr_dora": {"type": "lokr", "rank": 2, "alpha": 1.0, "dora": True},
    "loha": {"type": "loha", "rank": 4, "alpha": 2.0},
    "loha_bypass": {"type": "loha", "rank": 4, "alpha": 2.0, "bypass_mode": True},
    "lokr_rebuild": {"type": "lokr", "rank": 4, "alpha": 2.0, "bypass_mode": False},
    "loha_dora_rs": {"type": "loha", "rank": 4, "alpha": 2.0, "dora": True, "rs_lora": True},
    "locon_bypass": {"type": "locon", "rank": 4, "alpha": 2.0},
    "locon_dora_rank_by_regex": {"type": "locon", "rank": 4, "alpha": 2.0, "dora": True,
                                 "rank_by_regex": {r".*\.ff\..*": 8}},
}
OPT_IN = {"train_adaln": True, "train_llm_adapter": True}


@pytest.fixture(scope="module")
def pristine(tiny):
    from anima_core.model.dit import load_transformer

    return load_transformer(tiny.transformer).requires_grad_(False)


def build(options: dict, model):
    spec = installed_registry().spec("adapter", options["type"])
    adapter = spec.build(spec.options.model_validate(options))
    adapter.inject(model)
    return adapter


def trained_looking(options: dict, pristine, seed: int = 0):
    """(model, adapter) with every adapter parameter moved off its initial value, in eval mode."""
    model = copy.deepcopy(pristine)
    adapter = build({**options, **OPT_IN}, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.network.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    adapter.network.eval()
    return model, adapter


def forward_delta(linear, reference_linear) -> torch.Tensor:
    """The ΔW a module's forward applies: its output on the identity minus the untouched module's."""
    eye = torch.eye(linear.in_features)
    with torch.no_grad():
        return (linear(eye) - reference_linear(eye)).T.double()


def file_groups(path):
    groups = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        for key in f.keys():
            module, _, suffix = key.partition(".")
            groups.setdefault(module, {})[suffix] = f.get_tensor(key)
    return groups, meta


SUFFIXES = {
    "lokr": {"alpha", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "dora_scale"},
    "loha": {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "dora_scale"},
    "locon": {"alpha", "lora_down.weight", "lora_up.weight", "dora_scale"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_keys_follow_the_comfyui_rule_for_every_targeted_module(case, pristine, tiny, tmp_path):
    options = CASES[case]
    model, adapter = trained_looking(options, pristine)
    adapter.save(tmp_path / "a.safetensors", dtype=torch.bfloat16)
    groups, meta = file_groups(tmp_path / "a.safetensors")
    with safe_open(str(tiny.transformer), "pt") as f:
        comfy = comfy_key_map(f.keys())
    # The targets are core's lora set with both opt-ins: 2 blocks × (10 + 6 AdaLN) + 2 adapter blocks × 10.
    targeted = select_linears(model, LoRAOptions(**OPT_IN).target_patterns())
    assert len(targeted) == 52
    expected = {"lora_unet_" + model.original_module_name(path).replace(".", "_") for path in targeted}
    assert set(groups) == expected
    assert expected <= set(comfy)  # every key is one ComfyUI maps onto diffusion_model.<path>
    weights = dict(model.named_parameters())
    originals = {model.original_module_name(p): p for p in targeted}
    for module, parts in groups.items():
        assert set(parts) <= SUFFIXES[options["type"]], (module, sorted(parts))
        assert ("dora_scale" in parts) == options.get("dora", False)
        assert parts["alpha"].dtype == torch.float32  # bf16 would round alpha, and ComfyUI's scale with it
        shape = weights[originals[comfy[module]] + ".weight"].shape
        assert comfy_delta(parts, torch.zeros(shape)).shape == shape
    assert meta["anima_adapter"] == options["type"] and meta["ss_network_module"] == "lycoris.kohya"


@pytest.mark.parametrize("case", sorted(CASES))
def test_comfyui_delta_from_the_file_equals_the_forward_and_the_merge(case, pristine, tmp_path):
    model, adapter = trained_looking(CASES[case], pristine)
    adapter.save(tmp_path / "a.safetensors")
    groups, _ = file_groups(tmp_path / "a.safetensors")
    targeted = select_linears(model, LoRAOptions(**OPT_IN).target_patterns())
    reference = dict(pristine.named_modules())
    forward = {}
    for path, linear in targeted.items():
        key = "lora_unet_" + model.original_module_name(path).replace(".", "_")
        forward[path] = forward_delta(linear, reference[path])
        comfy = comfy_delta(groups[key], reference[path].weight)
        assert comfy.abs().max() > 1e-3, key  # a real update, not a zero that matches anything
        torch.testing.assert_close(forward[path], comfy, rtol=1e-4, atol=1e-5, msg=key)
    adapter.merge()
    for path, linear in targeted.items():
        merged = (linear.weight - reference[path].weight).double()
        torch.testing.assert_close(merged, forward[path], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(forward_delta(linear, reference[path]), forward[path], rtol=1e-4, atol=1e-5)
    adapter.unmerge()
    for path, linear in targeted.items():
        torch.testing.assert_close(forward_delta(linear, reference[path]), forward[path], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(linear.weight, reference[path].weight, rtol=0, atol=1e-6)


def test_lokr_full_matrix_mode_saves_the_alpha_comfyui_reads_as_scale_one(pristine, tmp_path):
    _, adapter = trained_looking(CASES["lokr"], pristine)
    adapter.save(tmp_path / "a.safetensors")
    groups, _ = file_groups(tmp_path / "a.safetensors")
    full = [parts for parts in groups.values() if "lokr_w2" in parts]
    decomposed = [parts for parts in groups.values() if "lokr_w2_a" in parts]
    assert full and decomposed  # both modes on the tiny model with rank 4, factor 8
    assert all(float(p["alpha"]) == 4.0 for p in full)  # = rank: scale 1 under alpha/rank as well
    assert all(float(p["alpha"]) == 2.0 and p["lokr_w2_b"].shape[0] == 4 for p in decomposed)
    # With rs-scaling lycoris would use √rank in full-matrix mode, which ComfyUI never applies; we pin 1.
    _, rs = trained_looking(CASES["lokr_full_matrix_rs"], pristine)
    assert {m.scale for _, m in rs.network.entries()} == {1.0}


def test_two_networks_in_one_process_keep_their_own_settings(pristine):
    from lycoris import LycorisNetwork

    before = {k: copy.deepcopy(getattr(LycorisNetwork, k)) for k in
              ("LORA_PREFIX", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "USE_FNMATCH", "MODULE_ALGO_MAP")}
    a_model, b_model = copy.deepcopy(pristine), copy.deepcopy(pristine)
    a = build({"type": "lokr", "rank": 2, "factor": 4, "decompose_both": True}, a_model)
    b = build({"type": "locon", "rank": 8, "alpha": 2.0, "dora": True, "train_llm_adapter": True}, b_model)
    a_again = build({"type": "lokr", "rank": 2, "factor": 4, "decompose_both": True}, copy.deepcopy(pristine))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in a_again.state_dict().items()}
    a_sd, b_sd = a.state_dict(), b.state_dict()
    assert len({k.split(".")[0] for k in a_sd}) == 20 and len({k.split(".")[0] for k in b_sd}) == 40
    assert a_sd["lora_unet_blocks_0_mlp_layer1.lokr_w1"].shape == (4, 4)  # 256×64 with factor 4
    assert not any("dora_scale" in k or "lora_down" in k for k in a_sd)
    assert b_sd["lora_unet_blocks_0_mlp_layer1.lora_down.weight"].shape == (8, 64)
    assert "lora_unet_llm_adapter_blocks_0_self_attn_q_proj.dora_scale" in b_sd
    assert {m.bypass_mode for _, m in a.network.entries()} == {True}  # LoKr default
    assert {m.bypass_mode for _, m in b.network.entries()} == {False}  # DoRA: never bypass
    assert all(getattr(LycorisNetwork, k) == v for k, v in before.items())  # no class-level preset touched


def test_weight_decay_skips_lokr_w1_and_the_llm_adapter_gets_its_own_lr(pristine):
    from anima_core.training.phases.optimizer import _param_groups

    adapter = build({"type": "lokr", "rank": 2, "train_llm_adapter": True, "llm_adapter_lr": 1e-5},
                    copy.deepcopy(pristine))
    names = {id(p): n for n, p in adapter.network.named_parameters()}
    groups = _param_groups(adapter, 0.1)
    by = {(g.get("lr"), g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in groups}
    assert set(by) == {(None, 0.1), (None, 0.0), (1e-5, 0.1), (1e-5, 0.0)}
    assert all("lokr_w1" in n for k, ns in by.items() if k[1] == 0.0 for n in ns)
    assert not any("lokr_w1" in n for k, ns in by.items() if k[1] == 0.1 for n in ns)
    assert all(n.startswith("lora_unet_llm_adapter") for k, ns in by.items() if k[0] == 1e-5 for n in ns)
    assert not any(n.startswith("lora_unet_llm_adapter") for k, ns in by.items() if k[0] is None for n in ns)
    assert sum(len(ns) for ns in by.values()) == len(names)
    loha = build({"type": "loha", "rank": 2}, copy.deepcopy(pristine))
    assert len(_param_groups(loha, 0.1)) == 1  # only LoKr excludes anything


def test_validation_messages():
    reg = installed_registry()
    with pytest.raises(ConfigError, match="bypass_mode must be off with dora"):
        validate_config({"adapter": {"type": "locon", "dora": True, "bypass_mode": True}}, reg)
    with pytest.raises(ConfigError, match="adapter.factor"):
        validate_config({"adapter": {"type": "lokr", "factor": 0}}, reg)
    with pytest.raises(ConfigError, match="invalid regex"):
        validate_config({"adapter": {"type": "loha", "targets": ["(unclosed"]}}, reg)
    ok = validate_config({"adapter": {"type": "loha", "dropout": 0.1, "llm_adapter_lr": 1e-5}}, reg)
    assert sorted(w.path for w in ok.warnings) == ["adapter.dropout", "adapter.llm_adapter_lr"]
    assert validate_config({"adapter": {"type": "locon", "dropout": 0.1}}, reg).warnings == []  # bypass: applied


def test_dropouts_act_in_training_mode_only(pristine):
    model = copy.deepcopy(pristine)
    adapter = build({"type": "locon", "rank": 4, "dropout": 0.5, "rank_dropout": 0.5, "module_dropout": 0.5},
                    model)
    with torch.no_grad():
        for _, m in adapter.network.entries():
            m.lora_up.weight.normal_()
    linear = dict(model.named_modules())["transformer.transformer_blocks.0.attn1.to_q"]
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    adapter.network.eval()
    with torch.no_grad():
        assert torch.equal(linear(x), linear(x))
        adapter.network.train()
        torch.manual_seed(0)
        outs = [linear(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_lokr_rank_dropout_draws_the_same_mask_as_lycoris():
    """Our LoKr moves lycoris' CPU-drawn rank-dropout mask to the weight's device (a CUDA crash otherwise); on the
    CPU it must give lycoris' own result from the same random stream."""
    from lycoris.modules.lokr import LokrModule

    from anima_adapters_lycoris.adapter import DeviceSafeLokrModule

    torch.manual_seed(0)
    ours = DeviceSafeLokrModule("x", torch.nn.Linear(64, 64), 1.0, 2, 2.0, 0.0, 0.5, 0.0, factor=8)
    theirs = LokrModule("x", torch.nn.Linear(64, 64), 1.0, 2, 2.0, 0.0, 0.5, 0.0, factor=8)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    a = ours.get_weight(ours.shape)
    torch.manual_seed(1)
    b = theirs.get_weight(theirs.shape)
    assert torch.equal(a, b)
    assert (a == 0).all(dim=1).any() and not (a == 0).all()  # some rows dropped, not all


@pytest.mark.parametrize("case", sorted(k for k, v in CASES.items() if not v.get("dora")))
def test_on_an_fp8_base_every_algorithm_trains_and_saves_the_same_keys(case, tiny, tmp_path):
    # model.base_precision: fp8 stores the block Linears in float8: the rebuild path cannot add ΔW to them, so the
    # adapter must switch to bypass there and still save the file a bf16 base would get.
    from anima_core.model.dit import load_transformer

    files = {}
    for precision in ("dtype", "fp8"):
        model = load_transformer(tiny.transformer, base_precision=precision).requires_grad_(False)
        torch.manual_seed(0)
        adapter = build(CASES[case], model)  # DiT targets only: the test feeds the context directly
        params = [p for g in adapter.get_param_groups(0.0) for p in g["params"]]
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        x, t, ctx = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.5]), torch.randn(1, 512, 32)
        model(x, t, ctx).pow(2).mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), precision
        assert {p.dtype for p in params} == {torch.float32}
        adapter.save(tmp_path / f"{precision}.safetensors", {}, dtype=torch.bfloat16)
        files[precision] = file_groups(tmp_path / f"{precision}.safetensors")[0]
    plain, quant = files["dtype"], files["fp8"]
    assert plain.keys() == quant.keys()
    for module in plain:
        assert {s: (v.shape, v.dtype) for s, v in plain[module].items()} == \
               {s: (v.shape, v.dtype) for s, v in quant[module].items()}, module


def test_dora_on_an_fp8_base_is_a_config_error():
    reg = installed_registry()
    with pytest.raises(ConfigError, match="adapter.dora"):
        validate_config({"model": {"base_precision": "fp8"}, "adapter": {"type": "loha", "dora": True}}, reg)
    forced = validate_config({"model": {"base_precision": "fp8"}, "adapter": {"type": "lokr", "bypass_mode": False}},
                             reg)
    assert [w.path for w in forced.warnings] == ["adapter.bypass_mode"]
