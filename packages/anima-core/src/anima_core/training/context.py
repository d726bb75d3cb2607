"""What a training run holds, grouped by the phase that fills it: a phase may read every group filled before it
and writes only its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from anima_core.config.sections import TrainingConfig
    from anima_core.data import TrainingData
    from anima_core.model.dit import AnimaDiT
    from anima_core.model.text_encoder import TextEncoder
    from anima_core.model.vae import AnimaVAE
    from anima_core.plugin_host import Registry
    from anima_core.training.monitor import Monitor
    from anima_core.training.signals import StopFlag


@dataclass
class Bootstrap:
    """bootstrap: process, devices, folders, logging."""

    accelerator: Accelerator
    output_dir: Path
    state_root: Path
    sample_dir: Path
    cache_dir: Path
    monitor: Monitor
    stop: StopFlag
    resume_from: Optional[Path] = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class Models:
    """models: the frozen model set and the adapter injected into the DiT."""

    dit: AnimaDiT
    text: TextEncoder
    vae: AnimaVAE
    adapter: Any
    dtype: torch.dtype
    train_module: torch.nn.Module  # DiT + adapter parameters as one module
    block_swap: Any = None  # anima_core.model.block_swap.BlockSwap when model.blocks_to_swap > 0


@dataclass
class Dataset:
    """dataset: batches of cached latents and processed captions."""

    data: TrainingData


@dataclass
class Optimization:
    """optimizer: everything that updates the adapter, and the step budget."""

    optimizer: Any
    scheduler: Any
    timestep_sampler: Any
    loss: Any
    params: list
    capabilities: frozenset[str]
    steps_per_epoch: int
    total_steps: int
    epochs: int


@dataclass
class Progress:
    """resume / loop: where the run stands (saved in every state)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    skipped_nonfinite: int = 0
    rank_checks: int = 0
    last_state: Optional[Path] = None
    last_lora: Optional[Path] = None


@dataclass
class TrainingContext:
    config: TrainingConfig
    registry: Registry
    bootstrap: Optional[Bootstrap] = None
    models: Optional[Models] = None
    dataset: Optional[Dataset] = None
    optimization: Optional[Optimization] = None
    progress: Progress = field(default_factory=Progress)
    resume_request: Optional[str] = None  # "auto", a state folder, or None
    interrupted: bool = False
