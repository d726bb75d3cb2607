"""The demo's procedural shapes dataset, its scorer, and the packaged pretrained base (files, formats, loaders)."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from anima_core.demo import base_model_paths, scoring, shapes
from anima_core.demo.base import FILE_NAMES


def _pixels(image):
    return np.asarray(image)


def test_generator_is_deterministic_and_covers_every_combination():
    first = list(shapes.generate(96, seed=5))
    again = list(shapes.generate(96, seed=5))
    other = list(shapes.generate(96, seed=6))
    assert all(np.array_equal(_pixels(a), _pixels(b)) and ca == cb for (a, ca), (b, cb) in zip(first, again))
    assert any(not np.array_equal(_pixels(a), _pixels(b)) for (a, _), (b, _) in zip(first, other))
    captions = [c for _, c in first]
    # one shuffled cycle of 4 colours × 3 shapes × 4 positions × 2 sizes: each combination exactly once
    assert sorted(captions) == sorted(spec.caption for spec in shapes.all_specs())
    assert all(image.size == (64, 64) and image.mode == "RGB" for image, _ in first)


def test_pretraining_colours_leave_out_the_held_out_one():
    assert shapes.HELD_OUT in shapes.COLOURS and shapes.HELD_OUT not in shapes.SEEN_COLOURS
    assert not any(shapes.HELD_OUT in caption for _, caption in shapes.generate(200, seed=0))


def test_write_dataset_writes_images_with_captions(tmp_path):
    folder = shapes.write_dataset(tmp_path / "d", 5, seed=1, colours=[shapes.HELD_OUT], start=10)
    pngs = sorted(folder.glob("*.png"))
    assert [p.stem for p in pngs] == [f"shape_{i:04d}" for i in range(10, 15)]
    for png in pngs:
        spec = shapes.parse_caption(png.with_suffix(".txt").read_text().strip())
        assert spec.colour == shapes.HELD_OUT
        assert scoring.read(Image.open(png)) == scoring.Reading(spec.colour, spec.shape, spec.position, spec.size)


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_scorer_reads_ground_truth_images_correctly(blur):
    # every colour (the held-out one too), ~2.5 cycles of all combinations; blur: generated samples are soft
    pairs = list(shapes.generate(300, seed=11, colours=shapes.COLOURS))
    images = [im.filter(ImageFilter.GaussianBlur(blur)) if blur else im for im, _ in pairs]
    scores = scoring.score(images, [c for _, c in pairs])
    assert scores.colour == 1.0 and scores.position == 1.0
    # blur rounds corners (a small square starts to read as a circle): shape is the softest attribute
    assert scores.shape >= (1.0 if blur == 0 else 0.85) and scores.size >= (1.0 if blur == 0 else 0.95)


def test_scorer_sees_nothing_on_a_background_and_rejects_other_sizes():
    blank = Image.new("RGB", (64, 64), shapes.BACKGROUNDS[0])
    assert scoring.read(blank) == scoring.Reading(None, None, None, None)
    assert scoring.concept_rate([blank], shapes.HELD_OUT) == 0.0
    with pytest.raises(ValueError, match="64×64"):
        scoring.read(Image.new("RGB", (32, 32)))
    with pytest.raises(ValueError, match="one caption per image"):
        scoring.score([blank], [])


def test_concept_rate_counts_the_dominant_colour():
    purple = [im for im, _ in shapes.generate(6, seed=2, colours=[shapes.HELD_OUT])]
    red = [im for im, _ in shapes.generate(2, seed=2, colours=["red"])]
    assert scoring.concept_rate(purple + red, shapes.HELD_OUT) == 0.75


def test_packaged_base_is_complete_small_and_in_the_official_formats():
    from safetensors import safe_open

    base = base_model_paths()
    files = [getattr(base, key) for key in FILE_NAMES]
    total = sum(p.stat().st_size for f in files for p in ([f] if f.is_file() else f.rglob("*")))
    assert total <= 20_000_000
    assert (base.transformer.parent / "MADE.md").is_file()
    with safe_open(str(base.transformer), "pt") as fh:
        keys = list(fh.keys())
    assert all(k.startswith("net.") for k in keys) and "net.llm_adapter.embed.weight" in keys
    with safe_open(str(base.text_encoder), "pt") as fh:
        assert all(k.startswith("model.") for k in fh.keys())
    with safe_open(str(base.vae), "pt") as fh:
        assert "encoder.conv1.weight" in fh.keys() and "decoder.upsamples.0.residual.0.gamma" in fh.keys()


def test_packaged_base_loads_and_knows_every_colour_word():
    from anima_core.model.models import AnimaModels

    base = base_model_paths()
    models = AnimaModels.load(base.transformer, base.text_encoder, base.vae, base.qwen_tokenizer,
                              base.t5_tokenizer)
    t5 = models.text.t5_tokenizer
    for word in shapes.COLOURS:  # one whole-word piece each: 'purple' is in the vocabulary, only never trained
        assert len(t5(word, add_special_tokens=False)["input_ids"]) == 1
    assert models.dit.transformer.config.num_layers >= 2


def test_base_model_paths_names_missing_files(tmp_path):
    from anima_core.errors import UserError

    with pytest.raises(UserError, match="missing: .*anima-demo.safetensors"):
        base_model_paths(tmp_path)
