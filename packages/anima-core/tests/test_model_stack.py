"""The model stack on a tiny model set written in the official formats, through the real loaders."""

import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from anima_core.errors import UserError
from anima_core.model.checkpoint import CheckpointError
from anima_core.model.dit import load_transformer
from anima_core.model.models import AnimaModels
from anima_core.model.text_encoder import load_tokenizer
from anima_core.model.vae import load_vae
from anima_core.testing.tiny import write_tiny_model_set


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def models(tiny):
    return AnimaModels.load(tiny.transformer, tiny.text_encoder, tiny.vae, tiny.qwen_tokenizer,
                            tiny.t5_tokenizer)


def _torchvision_shim(monkeypatch):
    """diffusers' standard Anima forward needs torchvision for an all-zero mask; give the reference path a
    nearest-resize stand-in (tests only; anima itself never needs it)."""
    import diffusers.models.transformers.transformer_cosmos as tc

    shim = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=lambda x, size, interpolation=None, **k: F.interpolate(
            x, size=list(size), mode="nearest")),
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))
    monkeypatch.setattr(tc, "transforms", shim, raising=False)


def test_dit_forward_never_needs_torchvision(models):
    import diffusers.models.transformers.transformer_cosmos as tc

    assert not hasattr(tc, "transforms")  # torchvision is not installed beside this torch
    x = torch.randn(2, 16, 1, 8, 8)
    out = models.predict_velocity(x, torch.tensor([0.3, 0.9]), models.encode_prompts(["a", "b c"]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_parity_with_diffusers_reference_classes(tiny, models, monkeypatch):
    """Same tiny weights through our single-file loaders vs straight into diffusers' classes with their own
    converter and their own (standard-configuration) forward."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    _torchvision_shim(monkeypatch)
    raw = load_file(str(tiny.transformer))
    adapter_sd = {k.split("llm_adapter.", 1)[1]: v for k, v in raw.items() if "llm_adapter." in k}
    dit_sd = {k: v for k, v in raw.items() if "llm_adapter." not in k}
    ref_dit = CosmosTransformer3DModel(**{**tiny.dit_config, "in_channels": 16, "concat_padding_mask": True})
    ref_dit.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(dit_sd), strict=True)
    ref_adapter = AnimaTextConditioner(**tiny.adapter_config)
    ref_adapter.load_state_dict(adapter_sd, strict=True)
    qwen = Qwen3Model(Qwen3Config(**tiny.qwen_config))
    qwen.load_state_dict({k.removeprefix("model."): v for k, v in load_file(str(tiny.text_encoder)).items()})
    qtok = AutoTokenizer.from_pretrained(str(tiny.qwen_tokenizer), local_files_only=True)
    ttok = AutoTokenizer.from_pretrained(str(tiny.t5_tokenizer), local_files_only=True)

    prompt = "1girl, red hair, smile"
    q = qtok([prompt], return_tensors="pt", add_special_tokens=False)
    hidden = qwen(**q).last_hidden_state * q.attention_mask.unsqueeze(-1)
    t5 = ttok([prompt], return_tensors="pt")  # the tokenizer appends </s>
    with torch.no_grad():
        ref_ctx = ref_adapter(hidden, t5.input_ids, t5.attention_mask, q.attention_mask)
        ours_ctx = models.encode_prompts([prompt])
        assert ours_ctx.shape == ref_ctx.shape and ref_ctx.shape[1] == 512
        assert (ours_ctx - ref_ctx).abs().max() <= 1e-5

        x = torch.randn(1, 16, 1, 8, 12)
        sigma = torch.tensor([0.7])
        ref_v = ref_dit(x, sigma, ref_ctx, padding_mask=torch.zeros(1, 1, 64, 96), return_dict=False)[0]
        ours_v = models.predict_velocity(x, sigma, ours_ctx)
    assert (ours_v - ref_v).abs().max() <= 1e-5


def test_text_encoding_rules(models):
    text = models.text
    empty = text.tokenize([""])
    assert empty.qwen_ids.tolist() == [[text.qwen_pad_id]] and empty.qwen_mask.tolist() == [[1]]
    assert empty.t5_ids.tolist() == [[text.t5_eos_id]] and empty.t5_weights.tolist() == [[1.0]]

    plain = text.tokenize(["red hair"])
    bos = getattr(text.qwen_tokenizer, "bos_token_id", None)
    assert bos is None or bos not in plain.qwen_ids[0].tolist()
    assert plain.qwen_ids[0].tolist() == text.qwen_tokenizer("red hair", add_special_tokens=False)["input_ids"]
    assert plain.t5_ids[0, -1].item() == text.t5_eos_id

    weighted = text.tokenize(["(red hair:1.5), smile"])
    n_red = len(text.t5_tokenizer("red hair", add_special_tokens=False)["input_ids"])
    assert weighted.t5_weights[0, :n_red].tolist() == [1.5] * n_red
    assert weighted.t5_weights[0, -1].item() == 1.0

    escaped = text.tokenize([r"oil painting \(medium\)"])
    literal = text.qwen_tokenizer("oil painting (medium)", add_special_tokens=False)["input_ids"]
    assert escaped.qwen_ids[0].tolist() == literal and escaped.t5_weights[0].eq(1.0).all()


def test_weights_scale_the_context_rows(models):
    base = models.encode_prompts(["red hair"])
    strong = models.encode_prompts(["(red hair:2.0)"])
    n = len(models.text.t5_tokenizer("red hair", add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(strong[0, :n], 2.0 * base[0, :n])
    assert base[0, n + 1:].abs().max() == 0  # zero past the T5 length (</s> at n)


def test_batches_of_different_lengths_are_masked(models):
    short, long = "smile", "1girl, long red hair, blue eyes, school uniform, smile, outdoors"
    batch = models.encode_prompts([short, long])
    torch.testing.assert_close(batch[0:1], models.encode_prompts([short]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1:2], models.encode_prompts([long]), atol=1e-5, rtol=1e-5)


def test_long_prompts_are_not_truncated_for_inference(models):  # ComfyUI: 512 is a floor, not a cap
    caption = ", ".join(f"tag{i}" for i in range(400))
    ids = models.text.tokenize([caption])
    assert ids.t5_ids.shape[1] > 512
    ctx = models.encode_prompts([caption])
    assert ctx.shape[1] == ids.t5_ids.shape[1] and ctx[0, -1].abs().sum() > 0


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_other_prefixes_and_extra_buffers_load_identically(tiny, tmp_path, prefix):
    raw = load_file(str(tiny.transformer))
    moved = {prefix + k.removeprefix("net."): v for k, v in raw.items()}
    moved[prefix + "pos_embedder.seq"] = torch.arange(4.0)
    moved[prefix + "accum_iteration"] = torch.tensor([3])
    path = tmp_path / "moved.safetensors"
    save_file(moved, str(path))
    a, b = load_transformer(tiny.transformer), load_transformer(path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_loader_errors_name_the_file_and_the_problem(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="model.transformer: file not found: .*nope.safetensors"):
        load_transformer(tmp_path / "nope.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny.transformer.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(truncated)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_transformer(junk)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="pickle-based checkpoint"):
        load_transformer(pickle)
    with pytest.raises(CheckpointError, match="expected the Anima DiT .* found the Qwen-Image / Wan2.1 VAE"):
        load_transformer(tiny.vae)
    with pytest.raises(CheckpointError, match="model.vae: expected .* found the Anima DiT"):
        load_vae(tiny.transformer)


def test_missing_and_unexpected_keys_are_listed_by_original_name(tiny, tmp_path):
    raw = load_file(str(tiny.transformer))
    del raw["net.blocks.1.self_attn.q_proj.weight"]
    raw["net.blocks.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    path = tmp_path / "broken.safetensors"
    save_file(raw, str(path))
    with pytest.raises(CheckpointError) as info:
        load_transformer(path)
    msg = str(info.value)
    assert "1 missing (e.g. blocks.1.self_attn.q_proj.weight)" in msg
    assert "1 unexpected" in msg and str(path) in msg


def test_missing_tokenizer_says_what_is_needed_and_where(tmp_path):
    with pytest.raises(UserError, match="model.t5_tokenizer is not set: .*T5 tokenizer.*google/t5-v1_1-xxl"):
        load_tokenizer(None, "t5_tokenizer")
    with pytest.raises(UserError, match="model.qwen_tokenizer: .* is not a folder"):
        load_tokenizer(tmp_path / "missing", "qwen_tokenizer")


def test_vae_round_trip_and_normalisation(models):
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = models.encode_images(images)
    assert latents.shape == (1, 16, 1, 8, 8)
    raw = models.vae.vae.encode(images.unsqueeze(2)).latent_dist.mode()
    torch.testing.assert_close(latents, (raw - models.vae.mean) / models.vae.std)
    decoded = models.decode(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1.0


def test_lora_keys_follow_comfyui_and_merging_the_file_matches_the_training_forward(tiny, models, tmp_path):
    from anima_core.builtins.adapters import LoRAOptions
    from anima_core.lora import LoRAAdapter
    from anima_core.model.lora_files import apply_lora_file

    trained = load_transformer(tiny.transformer)
    adapter = LoRAAdapter(LoRAOptions(rank=4, alpha=2.0))
    adapter.inject(trained)
    modules = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_output_proj",
               "cross_attn_q_proj", "cross_attn_k_proj", "cross_attn_v_proj", "cross_attn_output_proj",
               "mlp_layer1", "mlp_layer2")
    assert set(adapter.network.loras) == {f"lora_unet_blocks_{i}_{m}" for i in range(tiny.dit_config["num_layers"])
                                         for m in modules}
    with torch.no_grad():
        for mod in adapter.network.loras.values():
            mod.lora_up.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    x, sigma, ctx = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.5]), models.encode_prompts(["1girl"])
    with torch.no_grad():
        trained_out = trained(x, sigma, ctx)
    path = tmp_path / "lora.safetensors"
    adapter.save(path)
    fresh = load_transformer(tiny.transformer)
    with torch.no_grad():
        base = fresh(x, sigma, ctx)
        applied = apply_lora_file(fresh, path, 1.0)
        merged = fresh(x, sigma, ctx)
        torch.testing.assert_close(merged, trained_out, atol=1e-5, rtol=1e-5)
        assert (merged - base).abs().max() > 1e-3
        applied.remove()
        torch.testing.assert_close(fresh(x, sigma, ctx), base, atol=1e-5, rtol=1e-5)


def test_diffusers_folders_load_the_same_model(tiny, models, tmp_path):
    """A diffusers-format pipeline folder (transformer/, text_conditioner/, vae/) and an HF Qwen3 folder give the
    same outputs as the single files."""
    from anima_core.testing.tiny import build_tiny_modules

    dit, adapter, qwen, vae = build_tiny_modules(seed=0)
    # the standard Anima configuration, as diffusers saves it (concat_padding_mask=True, 16 input channels)
    from diffusers import CosmosTransformer3DModel

    standard = CosmosTransformer3DModel(**{**tiny.dit_config, "in_channels": 16, "concat_padding_mask": True})
    standard.load_state_dict(dit.state_dict())
    standard.save_pretrained(tmp_path / "pipe" / "transformer")
    adapter.save_pretrained(tmp_path / "pipe" / "text_conditioner")
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    qwen.save_pretrained(tmp_path / "qwen")
    folder_models = AnimaModels.load(tmp_path / "pipe", tmp_path / "qwen", tmp_path / "pipe", tiny.qwen_tokenizer,
                                     tiny.t5_tokenizer)
    x, sigma = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.4])
    with torch.no_grad():
        ctx = folder_models.encode_prompts(["1girl"])
        torch.testing.assert_close(ctx, models.encode_prompts(["1girl"]))
        torch.testing.assert_close(folder_models.predict_velocity(x, sigma, ctx), models.predict_velocity(x, sigma, ctx))
        torch.testing.assert_close(folder_models.decode(x), models.decode(x))


def test_text_encoder_loader_rejects_other_components(tiny):
    from anima_core.model.text_encoder import load_qwen3

    with pytest.raises(CheckpointError, match="model.text_encoder: expected the Qwen3-0.6B .* found the Anima DiT"):
        load_qwen3(tiny.transformer)


def test_dtypes_backends_and_gradient_checkpointing(tiny, models):
    half = AnimaModels.load(tiny.transformer, tiny.text_encoder, tiny.vae, tiny.qwen_tokenizer, tiny.t5_tokenizer,
                            dtype="bf16", vae_dtype="fp32")
    assert next(half.dit.parameters()).dtype == torch.bfloat16
    assert next(half.text.qwen.parameters()).dtype == torch.bfloat16
    assert half.vae.dtype == torch.float32

    dit = load_transformer(tiny.transformer)
    dit.set_attention_backend("sdpa")
    with pytest.raises(KeyError):
        dit.set_attention_backend("magic")
    for p in dit.parameters():
        p.requires_grad_(True)
    dit.train()
    x, sigma, ctx = torch.randn(2, 16, 1, 8, 8), torch.tensor([0.2, 0.8]), models.encode_prompts(["a", "b"])

    def grads():
        dit.zero_grad()
        out = dit(x, sigma, ctx)
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in dit.parameters() if p.grad is not None]

    plain_out, plain_grads = grads()
    dit.set_gradient_checkpointing(True)
    assert dit.transformer.gradient_checkpointing
    ckpt_out, ckpt_grads = grads()
    torch.testing.assert_close(ckpt_out, plain_out)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_diffusers_style_lora_file_applies_like_ours(tiny, models, tmp_path):
    from anima_core.builtins.adapters import LoRAOptions
    from anima_core.lora import LoRAAdapter
    from anima_core.model.lora_files import apply_lora_file

    trained = load_transformer(tiny.transformer)
    adapter = LoRAAdapter(LoRAOptions(rank=2, alpha=1.0))
    adapter.inject(trained)
    with torch.no_grad():
        for mod in adapter.network.loras.values():
            mod.lora_up.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(2))
    ours = tmp_path / "ours.safetensors"
    adapter.save(ours)
    # the diffusion-pipe / PEFT form: diffusion_model.<original path>.lora_A/B, alpha folded into B
    sd = load_file(str(ours))
    peft = {}
    for key in {k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")}:
        path = key.removeprefix("lora_unet_")
        original = next(p for p in _original_linear_paths(trained) if p.replace(".", "_") == path)
        scale = float(sd[f"{key}.alpha"]) / sd[f"{key}.lora_down.weight"].shape[0]
        peft[f"diffusion_model.{original}.lora_A.weight"] = sd[f"{key}.lora_down.weight"]
        peft[f"diffusion_model.{original}.lora_B.weight"] = sd[f"{key}.lora_up.weight"] * scale
    other = tmp_path / "peft.safetensors"
    save_file(peft, str(other))
    x, sigma, ctx = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.6]), models.encode_prompts(["smile"])
    a, b = load_transformer(tiny.transformer), load_transformer(tiny.transformer)
    apply_lora_file(a, ours, 0.7)
    apply_lora_file(b, other, 0.7)
    with torch.no_grad():
        torch.testing.assert_close(a(x, sigma, ctx), b(x, sigma, ctx), atol=1e-5, rtol=1e-5)


def _original_linear_paths(dit):
    from anima_core.model.lora_files import original_paths

    return list(original_paths(dit))


def test_adaln_and_llm_adapter_targets_are_opt_in_and_round_trip(tiny, models, tmp_path):
    from anima_core.builtins.adapters import LoRAOptions
    from anima_core.lora import LoRAAdapter
    from anima_core.model.lora_files import apply_lora_file
    from anima_core.training.outputs import diffusers_export
    from anima_core.model.lora_files import original_paths

    default = LoRAAdapter(LoRAOptions())
    default.inject(load_transformer(tiny.transformer))
    assert not any("adaln" in k or "llm_adapter" in k for k in default.network.loras)

    trained = load_transformer(tiny.transformer)
    adapter = LoRAAdapter(LoRAOptions(rank=2, alpha=2.0, train_adaln=True, train_llm_adapter=True))
    adapter.inject(trained)
    keys = set(adapter.network.loras)
    layers = tiny.adapter_config["num_layers"]
    assert {f"lora_unet_blocks_0_adaln_modulation_{m}_{i}" for m in ("self_attn", "cross_attn", "mlp")
            for i in (1, 2)} <= keys
    assert {f"lora_unet_llm_adapter_blocks_{b}_{m}" for b in range(layers)
            for m in ("self_attn_q_proj", "self_attn_o_proj", "cross_attn_k_proj", "mlp_0", "mlp_2")} <= keys
    with torch.no_grad():
        for mod in adapter.network.loras.values():
            mod.lora_up.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(3))
    batch = models.text.tokenize(["1girl, smile"])
    hidden = models.text.encode_qwen(batch)
    x, sigma = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.5])

    def run(dit):
        with torch.no_grad():
            ctx = dit.condition(hidden, batch.qwen_mask, batch.t5_ids, batch.t5_mask, batch.t5_weights)
            return dit(x, sigma, ctx)

    expected = run(trained)
    path = tmp_path / "full.safetensors"
    adapter.save(path)
    merged = load_transformer(tiny.transformer)
    apply_lora_file(merged, path)
    torch.testing.assert_close(run(merged), expected, atol=1e-5, rtol=1e-5)
    # the diffusers/PEFT export (alpha folded into lora_B) applies identically
    exported = tmp_path / "diffusers.safetensors"
    save_file(diffusers_export(load_file(str(path)), original_paths(merged)), str(exported))
    assert all(k.startswith("diffusion_model.") and "alpha" not in k for k in load_file(str(exported)))
    other = load_transformer(tiny.transformer)
    apply_lora_file(other, exported)
    torch.testing.assert_close(run(other), expected, atol=1e-5, rtol=1e-5)
