"""The ``dataset`` config section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import field_validator, model_validator

from anima_core.options import StrictModel, field

DEFAULT_CAPTION_EXTENSIONS = [".json", ".txt", ".caption"]


class RegSection(StrictModel):
    """A regularisation (prior-preservation) folder, trained in the same epochs as the main set."""

    ui_group = "dataset"
    path: Path = field(..., "Folder of regularisation images (same layout as dataset.path: N_name sub-folders "
                            "repeat N times; same-stem captions).")
    caption: Optional[str] = field(None, "If set, every regularisation image uses this caption instead of its "
                                         "caption file (e.g. the class word, \"1girl\").")
    loss_weight: float = field(1.0, "Loss weight of regularisation images (training images weigh 1.0).", ge=0)
    repeats: int = field(1, "How often each regularisation image appears per epoch (on top of N_name folder "
                            "repeats).", ge=1)


class DatasetSection(StrictModel):
    ui_group = "dataset"
    path: Optional[Path] = field(None, "Folder of images (png/jpg/jpeg/webp/bmp, searched recursively) with "
                                       "same-stem captions (.json/.txt/.caption). Sub-folders named N_name "
                                       "repeat their images N times.")
    resolution: list[int] = field([1024], "Base resolution(s); several values train multi-resolution (every image "
                                          "at each of them).", min_length=1)
    repeats: int = field(1, "How often each image appears per epoch (on top of N_name folder repeats).", ge=1)
    caption_extensions: list[str] = field(list(DEFAULT_CAPTION_EXTENSIONS),
                                          "Caption files looked for beside each image, first found wins; .json is "
                                          "the tag-category JSON (a malformed one falls back to the next).",
                                          advanced=True, min_length=1)
    trigger: Optional[str] = field(None, "Trigger word put first in every training caption (never shuffled or "
                                         "dropped; not added to regularisation images).")
    shuffle_caption: bool = field(False, "Shuffle comma-separated tags after the first keep_tokens (JSON captions: "
                                         "within each shufflable category).")
    keep_tokens: int = field(0, "Leading comma-separated tags kept in place (not shuffled or dropped); the "
                                "trigger is not counted.", ge=0)
    tag_dropout: float = field(0.0, "Probability of dropping each tag that is not kept (training images only).",
                               ge=0, lt=1)
    caption_dropout: float = field(0.0, "Probability that a whole caption becomes empty (teaches the "
                                        "unconditional prediction used by CFG).", ge=0, lt=1)
    flip_aug: bool = field(False, "Randomly mirror images left-right (both versions are cached; each epoch picks "
                                  "one).")
    crop: Literal["center", "random"] = field("center", "Crop after resizing to the bucket: center, or a random "
                                                        "offset fixed per image (so cached latents stay valid).")
    aspect_ratio_limit: float = field(2.0, "Most elongated bucket allowed (long side / short side).", ge=1, le=8)
    bucket_step: int = field(64, "Bucket sides are multiples of this (a multiple of 16: VAE 8 × patch 2); the "
                                 "square base-resolution bucket always exists.", ge=16, multiple_of=16,
                             advanced=True)
    vae_batch_size: Optional[int] = field(None, "Images per VAE call while filling the latent cache (default: "
                                                "train.batch_size).", ge=1, advanced=True)
    cache_text_encoder: bool = field(False, "Encode each caption once with the text encoder and reuse it (needs "
                                            "deterministic captions: no shuffle or dropout).", advanced=True)
    reg: Optional[RegSection] = field(None, "Regularisation (prior-preservation) images, merged into each epoch.")

    @field_validator("resolution")
    @classmethod
    def _multiples_of_16(cls, value: list[int]) -> list[int]:
        bad = [r for r in value if r <= 0 or r % 16]
        if bad:
            raise ValueError(f"resolution values must be positive multiples of 16 (VAE 8 × patch 2), found {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"resolution lists a value twice: {value}")
        return value

    @field_validator("caption_extensions")
    @classmethod
    def _extensions(cls, value: list[str]) -> list[str]:
        value = [v.lower() for v in value]
        bad = [v for v in value if not v.startswith(".") or len(v) < 2 or "/" in v or "\\" in v]
        if bad:
            raise ValueError(f"caption_extensions must look like '.txt', found {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"caption_extensions lists a value twice: {value}")
        return value

    @field_validator("trigger")
    @classmethod
    def _trigger(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        value = value.strip()
        if "," in value:
            raise ValueError(f"trigger must be one tag (no comma), found {value!r}")
        return value or None

    @model_validator(mode="after")
    def _text_cache_needs_fixed_captions(self) -> DatasetSection:
        if self.cache_text_encoder:
            random_rules = [name for name, on in (("shuffle_caption", self.shuffle_caption),
                                                  ("tag_dropout", self.tag_dropout > 0),
                                                  ("caption_dropout", self.caption_dropout > 0)) if on]
            if random_rules:
                raise ValueError("cache_text_encoder needs captions that are the same every epoch; turn off "
                                 f"{', '.join(random_rules)} or turn off cache_text_encoder")
        return self
