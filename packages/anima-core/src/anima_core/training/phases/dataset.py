"""dataset: scan the folders and fill the latent cache (rank 0 encodes, the other ranks then read the cache)."""

from __future__ import annotations

from anima_core.data import build_training_data
from anima_core.training import residency
from anima_core.training.context import Dataset, TrainingContext


def run(ctx: TrainingContext) -> None:
    cfg, boot = ctx.config, ctx.bootstrap
    acc = boot.accelerator

    def build():
        return build_training_data(cfg.dataset, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                                   cache_dir=boot.cache_dir, vae=ctx.models.vae, rank=acc.process_index,
                                   world_size=acc.num_processes, progress=boot.is_main,
                                   should_stop=lambda: boot.stop.requested,
                                   text_encoder=ctx.models.text if boot.is_main else None)

    if acc.is_main_process:
        data = build()
    acc.wait_for_everyone()
    if not acc.is_main_process:
        data = build()
    if cfg.dataset.cache_text_encoder:  # captions are deterministic (the config validator made sure)
        data.attach_text_cache(ctx.models.text, progress=boot.is_main)
    for problem in data.problems:
        boot.monitor.note(f"warning: {problem}")
    ctx.dataset = Dataset(data=data)
    residency.after_caching(ctx)
