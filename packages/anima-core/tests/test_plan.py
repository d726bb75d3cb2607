"""``anima plan``: the planned step peak (fake tensors) against the same step measured on real CPU tensors, fp8 and
block-swap accounting, and the CLI as a user runs it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from anima_core.config.loading import validate_config
from anima_core.planning import step
from anima_core.planning.plan import CATEGORIES, plan, settings_from_config
from anima_core.planning.shapes import shapes_from_config
from anima_core.testing.tiny import write_tiny_model_set
from anima_core.testing.training import tiny_train_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    (root / "img").mkdir()
    return write_tiny_model_set(root / "models"), root


def _config(tiny, host, **sections):
    model_set, root = tiny
    return validate_config(tiny_train_config(model_set, root / "img", root / "out", **sections),
                           host.registry).config


def _real_step(model_set, config, registry):
    """The same step on the real model files (real CPU tensors), measured by the same tracker."""
    from anima_core.model.dit import load_transformer
    from anima_core.model.models import resolve_dtype
    from anima_core.model.text_encoder import load_qwen3

    s = settings_from_config(config)
    dtype = resolve_dtype(s.dtype)
    dit = load_transformer(model_set.transformer, dtype=dtype)
    resident = not s.cache_text_encoder
    qwen = load_qwen3(model_set.text_encoder, dtype=dtype) if resident else None
    torch.manual_seed(0)
    trainee = step.assemble(dit, qwen, config, registry, dtype=dtype,
                            gradient_checkpointing=s.gradient_checkpointing, base_fp8=s.base_fp8,
                            text_encoder_fp8=s.text_encoder_fp8, text_encoder_resident=resident)
    shape = step.StepShape(s.batch_size, s.width, s.height, mixed_precision=s.mixed_precision,
                           grad_clip=s.grad_clip)
    return step.measure(trainee, shape, qwen_hidden_size=model_set.qwen_config["hidden_size"], count_flops=False)


@pytest.mark.parametrize("sections", [
    {},  # fp32, no autocast, text encoder on the device, GC off
    {"model": {"dtype": "bf16", "gradient_checkpointing": True}, "train": {"mixed_precision": "bf16"},
     "dataset": {"cache_text_encoder": True}},
], ids=["fp32-te-resident", "bf16-gc-cached"])
def test_plan_peak_matches_real_step_within_10_percent(tiny, builtin_host, sections):
    config = _config(tiny, builtin_host, **sections)
    planned = plan(config, builtin_host.registry)
    real = _real_step(tiny[0], config, builtin_host.registry)
    ratio = planned.total / real.total
    print(f"plan {planned.total} B, real {real.total} B, ratio {ratio:.4f}")
    assert abs(ratio - 1) <= 0.10
    assert set(planned.device) == set(CATEGORIES)
    assert (planned.device["text encoder"] > 0) == (not config.dataset.cache_text_encoder)
    assert planned.caching["vae weights"] > 0


def test_fp8_halves_the_block_linear_weights(tiny, builtin_host):
    config = _config(tiny, builtin_host, model={"dtype": "bf16"}, dataset={"cache_text_encoder": True})
    plain = plan(config, builtin_host.registry)
    fp8 = plan(config, builtin_host.registry, settings=plain.settings.changed(base_fp8=True))
    assert plain.block_linear_weight_bytes > 0
    assert fp8.block_linear_weight_bytes * 2 == plain.block_linear_weight_bytes
    assert fp8.device["base weights"] < plain.device["base weights"]
    # the adapter is unchanged by fp8
    assert fp8.device["adapter + grads + optimizer"] == plain.device["adapter + grads + optimizer"]


def test_block_swap_lowers_the_device_peak_and_reports_host_bytes(tiny, builtin_host):
    config = _config(tiny, builtin_host, model={"gradient_checkpointing": True}, dataset={"cache_text_encoder": True})
    shapes = shapes_from_config(config.model)
    # four blocks (the tiny files have two): swapping all of them frees two blocks net of the two device slots
    shapes = dataclasses.replace(shapes, dit={**shapes.dit, "num_layers": 4})
    none = plan(config, builtin_host.registry, shapes=shapes)
    swapped = plan(config, builtin_host.registry, shapes=shapes,
                   settings=none.settings.changed(blocks_to_swap=4))
    block = none.block_weight_bytes[-1]
    assert swapped.total < none.total
    assert swapped.device["base weights"] == none.device["base weights"] - sum(none.block_weight_bytes)
    assert 0.9 * 2 * block <= swapped.device["swap buffers"] <= 1.1 * 2 * block  # two slots of one block
    assert swapped.device["activations"] == none.device["activations"]
    assert swapped.host["pinned swapped blocks"] == swapped.swap_host_bytes > 3.5 * block
    assert none.host["pinned swapped blocks"] == 0
    # applying swap to a measured plan gives the same figures as planning with it
    assert none.with_swap(4).device == swapped.device


def _write_config(tiny, **sections) -> Path:
    model_set, root = tiny
    path = root / f"plan-{len(list(root.glob('plan-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(model_set, root / "img", root / "out", **sections)))
    return path


def test_cli_prints_the_categories_and_fits_a_generous_budget(tiny, anima):
    result = anima("plan", _write_config(tiny), "--vram", "100")
    assert result.returncode == 0, result.stderr
    for name in (*CATEGORIES, "total", "host RAM", "vae (during caching only)"):
        assert name in result.stdout
    assert "fits in 100 GB" in result.stdout


def test_cli_tiny_budget_says_what_does_not_fit(tiny, anima):
    result = anima("plan", _write_config(tiny, model={"gradient_checkpointing": True},
                                         dataset={"cache_text_encoder": True}, train={"batch_size": 1}),
                   "--vram", "0.000001")
    assert result.returncode == 0, result.stderr
    assert "does not fit in 1e-06 GB" in result.stdout
    assert "model.base_precision: fp8" in result.stdout
    assert "model.blocks_to_swap" in result.stdout


def test_cli_missing_config_exits_2_without_traceback(tmp_path, anima):
    result = anima("plan", tmp_path / "missing.yaml")
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "missing.yaml" in result.stderr


def test_plan_command_module_does_not_import_torch():
    code = "import sys, anima_core.cli.plan_cmd; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
