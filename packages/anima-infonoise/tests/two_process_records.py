"""Run under torchrun (2 processes, gloo on CPU) by test_infonoise_training.py: ranks record different numbers
of different losses, refresh, and write their sampler state to <out>/rank<r>.pt; then a tampered CDF on rank 1
must make the agreement check fail on every rank (<out>/mismatch<r>.txt)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from anima_infonoise.options import InfoNoiseOptions
from anima_infonoise.sampler import InfoNoiseSampler


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    s = InfoNoiseSampler(InfoNoiseOptions(bins=4, warmup_steps=1, refresh_every=1, min_per_bin=1), 100)
    g = torch.Generator().manual_seed(100 + rank)
    edges = s.bins.edges
    for _ in range(3 + 2 * rank):  # rank 1 records more batches (more non-regularisation samples)
        log_sigma = edges[0] + (edges[-1] - edges[0]) * torch.rand(5, generator=g, dtype=torch.float64)
        s.record(torch.sigmoid(log_sigma).float(), 1.0 + rank + torch.rand(5, generator=g))
    local = [[list(b), list(r)] for b, r in s.pending]
    s.maybe_refresh(1)
    torch.save({"state": s.state_dict(), "local_records": local,
                "samples": s.sample(32, torch.Generator().manual_seed(7))}, out / f"rank{rank}.pt")
    if rank == 1:
        s.cdf = s.cdf.clone()
        s.cdf[1] += 1e-9
    try:
        s._check_ranks_agree(1)
        message = "agreed"
    except RuntimeError as exc:
        message = str(exc)
    (out / f"mismatch{rank}.txt").write_text(message)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
