"""The core config sections. Plugin-provided sections (adapter, optimizer, ...) are typed here by their static
base class; :mod:`anima_core.config.schema` swaps in the discriminated union of the installed variants."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from anima_core.data.config import DatasetSection
from anima_core.options import (
    AdapterOptions,
    InferenceSamplerOptions,
    LossOptions,
    LRSchedulerOptions,
    OptimizerOptions,
    StrictModel,
    TimestepSamplerOptions,
    field,
    ui,
)

Precision = Literal["bf16", "fp16", "fp32"]


class ModelSection(StrictModel):
    ui_group = "model"
    transformer: Optional[Path] = field(None, "Anima DiT: the official single file (DiT + llm_adapter) or a "
                                              "diffusers directory.")
    text_encoder: Optional[Path] = field(None, "Qwen3-0.6B: one safetensors file or a Hugging Face directory.")
    vae: Optional[Path] = field(None, "Qwen-Image VAE: the single file (Wan2.1 layout) or a diffusers directory.")
    qwen_tokenizer: Optional[Path] = field(None, "Directory with the Qwen2/Qwen3 tokenizer files.", advanced=True)
    t5_tokenizer: Optional[Path] = field(None, "Directory with the T5 (t5-v1_1-xxl) tokenizer files.",
                                         advanced=True)
    dtype: Precision = field("bf16", "Weight dtype of the DiT and text encoder.")
    vae_dtype: Precision = field("fp32", "Weight dtype of the VAE.", advanced=True)
    attention: Literal["sdpa", "xformers", "flash"] = field("sdpa", "Attention backend.", advanced=True)
    gradient_checkpointing: bool = field(True, "Recompute activations in backward to save memory.")
    base_precision: Literal["dtype", "fp8"] = field(
        "dtype", "Storage of the frozen DiT Linear weights: 'dtype' keeps them in model.dtype; 'fp8' stores them in "
                 "float8_e4m3fn with a per-tensor scale and computes in model.dtype (half the bytes of bf16). Reads "
                 "a bf16 file (quantised at load) or a ComfyUI scaled-fp8 file. The LoRA is unchanged.")
    text_encoder_precision: Literal["dtype", "fp8"] = field(
        "dtype", "As base_precision, for the Linear weights of the Qwen3 text encoder.", advanced=True)
    blocks_to_swap: int = field(
        0, "Keep this many DiT blocks' weights in host memory and bring each to the GPU just before it runs "
           "(prefetched on a side stream). Saves ~0.14 GB (bf16) per block on the full model; costs host RAM and "
           "some speed. At most the model's block count (28 for Anima). Needs gradient_checkpointing.", ge=0)

    @model_validator(mode="after")
    def _swap_needs_checkpointing(self) -> ModelSection:
        if self.blocks_to_swap and not self.gradient_checkpointing:
            raise ValueError(f"blocks_to_swap: {self.blocks_to_swap} needs gradient_checkpointing: true (without it "
                             f"every block's activations stay on the GPU, which dwarfs the weights swapping saves)")
        return self


class LossWeighting(StrictModel):
    ui_group = "loss"
    scheme: Literal["none", "min_snr", "cosmap", "detail_inv_t"] = field("none", "Per-timestep loss weight.")
    min_snr_gamma: float = field(5.0, "γ of min-SNR weighting.", gt=0, show_when="scheme==min_snr")
    detail_inv_t_min: float = field(1.0, "Lower clamp of 1/t.", ge=1, le=20, show_when="scheme==detail_inv_t")
    detail_inv_t_max: float = field(5.0, "Upper clamp of 1/t.", ge=1, le=50, show_when="scheme==detail_inv_t")
    cap_ratio: float = field(0.0, "If > 1, cap weights within a batch at min(weight) × this ratio.", ge=0, le=50,
                             advanced=True)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> LossWeighting:
        if self.detail_inv_t_min > self.detail_inv_t_max:
            raise ValueError(f"detail_inv_t_min ({self.detail_inv_t_min}) must not exceed detail_inv_t_max "
                             f"({self.detail_inv_t_max})")
        return self


class NoiseOptions(StrictModel):
    ui_group = "train"
    type: Literal["none", "offset", "pyramid"] = field("none", "Extra structure added to the training noise.")
    offset: float = field(0.0, "Offset-noise strength (per sample and channel).", ge=0, show_when="type==offset")
    pyramid_iterations: int = field(6, "Pyramid (multi-resolution) noise levels.", ge=1,
                                    show_when="type==pyramid")
    pyramid_discount: float = field(0.35, "Pyramid noise discount per level.", gt=0, le=1,
                                    show_when="type==pyramid")


class TrainSection(StrictModel):
    ui_group = "train"
    seed: int = field(42, "Seed of every random draw in training (data order, captions, noise, timesteps).")
    max_steps: Optional[int] = field(None, "Stop after this many optimizer steps (wins over epochs).", ge=1)
    epochs: int = field(10, "Passes over the dataset (when max_steps is not set).", ge=1)
    batch_size: int = field(1, "Images per micro-batch (per process).", ge=1)
    grad_accum: int = field(1, "Micro-batches per optimizer step.", ge=1)
    mixed_precision: Literal["bf16", "fp16", "no"] = field("bf16", "Autocast precision (fp16 uses a grad scaler).")
    grad_clip: float = field(1.0, "Max gradient norm (0 disables clipping).", ge=0)
    cpu: bool = field(False, "Train on the CPU even when a GPU is available.", advanced=True)
    compile: bool = field(False, "torch.compile each DiT block (regional compilation: one graph reused by every "
                                 "block; the first steps are slower while it compiles).")
    loss_weighting: LossWeighting = Field(default_factory=LossWeighting, json_schema_extra=ui("loss"))
    noise: NoiseOptions = Field(default_factory=NoiseOptions, json_schema_extra=ui("train", advanced=True))

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value):
        # YAML 1.1 reads an unquoted `no` (and `off`, `false`) as the boolean false: that is the "no" the user wrote
        return "no" if value is False else value


class SampleSection(StrictModel):
    ui_group = "sample"
    sampler: Optional[InferenceSamplerOptions] = field(None, "Inference sampler for preview images.")
    prompts: list[str] = field([], "Preview prompts (rotating); empty disables previews.")
    negative_prompt: str = field("", "Negative prompt for CFG.")
    steps: int = field(30, "Sampling steps.", ge=1)
    cfg: float = field(4.0, "Classifier-free guidance scale (1 disables CFG).", ge=0)
    shift: float = field(3.0, "Flow-matching sigma shift (ComfyUI's Anima default is 3).", gt=0)
    width: int = field(1024, "Image width (multiple of 16).", ge=16, multiple_of=16)
    height: int = field(1024, "Image height (multiple of 16).", ge=16, multiple_of=16)
    seed: int = field(0, "Seed of the preview images (prompt i uses seed + i).")
    every_n_steps: Optional[int] = field(None, "Preview every N optimizer steps.", ge=1)
    every_n_epochs: Optional[int] = field(None, "Preview every N epochs.", ge=1)
    baseline: bool = field(True, "Preview with the untrained adapter before the first step.")


class OutputSection(StrictModel):
    ui_group = "output"
    dir: Path = field(Path("output"), "Folder for LoRA files, samples, state and logs.")
    name: str = field("anima_lora", "Base name of the saved LoRA files.", min_length=1)
    save_dtype: Precision = field("bf16", "Dtype of the saved LoRA tensors.")
    save_every_n_steps: Optional[int] = field(None, "Save the LoRA every N optimizer steps.", ge=1)
    save_every_n_epochs: Optional[int] = field(1, "Save the LoRA every N epochs.", ge=1)
    save_state_every_n_steps: Optional[int] = field(None, "Save the full training state every N steps.", ge=1)
    save_state_every_n_epochs: Optional[int] = field(1, "Save the full training state every N epochs.", ge=1)
    keep_states: int = field(2, "How many full states to keep (older ones are deleted; 0 keeps all).", ge=0,
                             advanced=True)
    export_diffusers: bool = field(False, "Also write diffusion_model.*.lora_A/B (alpha folded in) for diffusers.",
                                   advanced=True)
    cache_dir: Optional[Path] = field(None, "Latent cache folder (default: <dir>/cache).", advanced=True)
    log_every: int = field(10, "Log a line / update monitor_state.json every N steps.", ge=1, advanced=True)
    tensorboard: bool = field(True, "Write TensorBoard scalars to <dir>/tensorboard (if tensorboard is "
                                    "installed).", advanced=True)
    wandb_project: Optional[str] = field(None, "Log to this Weights & Biases project (needs wandb; also read "
                                               "from WANDB_PROJECT).", advanced=True)

    @field_validator("name")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        # The name is joined onto output.dir: a separator or '..' would write the LoRA files outside it. Characters
        # Windows refuses are refused too, so a config works on both (LoRA files often end up in ComfyUI there).
        bad = sorted({c for c in value if c in '/\\:*?"<>|' or ord(c) < 32})
        if bad:
            raise ValueError(f"must be a plain file name (it names files inside output.dir), found {value!r} with "
                             f"{' '.join(repr(c) for c in bad)}")
        if value.startswith(".") or value != value.strip():
            raise ValueError(f"must be a plain file name without a leading '.' or surrounding spaces (it names "
                             f"visible files inside output.dir), found {value!r}")
        return value


class TrainingConfig(StrictModel):
    """The static shape of a config. The model actually used is built at run time by
    :func:`anima_core.config.schema.training_config_model`, which narrows each plugin section to the installed
    variants; attribute access through this base stays typed."""

    model: ModelSection = Field(default_factory=ModelSection, json_schema_extra=ui("model"))
    dataset: DatasetSection = Field(default_factory=DatasetSection, json_schema_extra=ui("dataset"))
    adapter: Optional[AdapterOptions] = Field(None, json_schema_extra=ui("adapter"))
    optimizer: Optional[OptimizerOptions] = Field(None, json_schema_extra=ui("optimizer"))
    lr_scheduler: Optional[LRSchedulerOptions] = Field(None, json_schema_extra=ui("lr_scheduler"))
    loss: Optional[LossOptions] = Field(None, json_schema_extra=ui("loss"))
    timestep_sampler: Optional[TimestepSamplerOptions] = Field(None, json_schema_extra=ui("timestep_sampler"))
    train: TrainSection = Field(default_factory=TrainSection, json_schema_extra=ui("train"))
    sample: SampleSection = Field(default_factory=SampleSection, json_schema_extra=ui("sample"))
    output: OutputSection = Field(default_factory=OutputSection, json_schema_extra=ui("output"))
