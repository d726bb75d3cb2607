"""Proof of learning: ``anima train --demo`` (the real CLI, in a subprocess) teaches the packaged pretrained base the
colour it never saw, measured by the deterministic scorer on samples with fixed prompts and seeds; and
``anima generate --demo`` samples from the base."""

import json

import pytest
from PIL import Image

from anima_core.demo import scoring, shapes

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from conftest import run_anima

    out = tmp_path_factory.mktemp("demo")
    # the default budget (300 steps, ~2 min on 2 cores): what the README promises is what is tested
    result = run_anima("train", "--demo", "--output", out, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_demo_lora_learns_the_held_out_colour(demo_run):
    out, result = demo_run
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    # The base really generates: on 8 seen-concept prompts at least 6 samples show the asked colour (chance is
    # 1/4, a broken base shows none; the packaged base gets 8 of 8).
    assert before["seen"]["colour"] >= 0.75, before
    # The base has never seen purple: at most 2 of the 8 held-out prompts may come out purple by accident (a red
    # and blue blob can win the pixel vote; the packaged base gets 0 of 8).
    assert before["held_out_rate"] <= 0.25, before
    # After the LoRA at least 6 of the 8 held-out samples are purple (the default run gets 7; 200 steps get 5,
    # which fails here on purpose) and the rise is at least 4 samples out of 8: the same prompts and seeds are
    # used before and after, so this is the LoRA's doing, not sampling noise.
    assert after["held_out_rate"] >= 0.75 and after["held_out_rate"] - before["held_out_rate"] >= 0.5, summary
    # ...and it learned the word, not "paint everything purple": seen colours still come out right (7 of 8 after).
    assert after["seen"]["colour"] >= 0.625, summary
    for name in ("before_after.png", "summary.txt", "run/demo_lora.safetensors", "run/loss_curve.png"):
        assert (out / name).is_file(), name
    assert "purple" in result.stdout and "base" in result.stdout


@pytest.mark.slow
def test_generate_demo_samples_from_the_base_and_takes_the_lora(demo_run, tmp_path, anima):
    out, _ = demo_run
    plain, with_lora = tmp_path / "base.png", tmp_path / "lora.png"
    prompt = "purple circle, top left, large"
    first = anima("generate", "--demo", "--prompt", prompt, "--seed", "3", "--device", "cpu", "-o", plain,
                  timeout=300)
    assert first.returncode == 0, first.stderr
    second = anima("generate", "--demo", "--prompt", prompt, "--seed", "3", "--device", "cpu", "--lora",
                   out / "run" / "demo_lora.safetensors", "-o", with_lora, timeout=300)
    assert second.returncode == 0, second.stderr
    images = [Image.open(p) for p in (plain, with_lora)]
    assert all(image.size == (64, 64) for image in images)
    meta = json.loads(images[1].text["anima"])
    assert meta["steps"] == 20 and meta["loras"][0][0].endswith("demo_lora.safetensors")
    assert scoring.read(images[0]).colour != shapes.HELD_OUT


def test_demo_and_config_together_are_refused(tmp_path, anima):
    result = anima("generate", "--demo", "--config", tmp_path / "c.yaml", "--prompt", "x", "-o", tmp_path / "x.png")
    assert result.returncode == 2 and "--demo and --config" in result.stderr and "Traceback" not in result.stderr


def test_demo_config_validates_and_uses_the_packaged_base(tmp_path):
    from anima_core.config.loading import validate_config
    from anima_core.demo import base_model_paths
    from anima_core.plugin_host import get_host
    from anima_core.training.demo import HELD_OUT_IMAGES, SEEN_IMAGES, demo_config

    loaded = validate_config(demo_config(tmp_path, steps=10), get_host().registry, source="--demo")
    assert loaded.config.model.transformer == base_model_paths().transformer
    captions = [p.read_text() for p in (tmp_path / "data").glob("*.txt")]
    assert len(captions) == HELD_OUT_IMAGES + SEEN_IMAGES
    assert sum(shapes.HELD_OUT in c for c in captions) == HELD_OUT_IMAGES
