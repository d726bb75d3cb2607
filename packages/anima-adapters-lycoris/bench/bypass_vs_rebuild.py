"""Forward+backward time of one 2048×2048 Linear (the real DiT's attention width) with each variant, bypass mode vs
rebuilding ΔW, printed side by side as a ratio. Run: python packages/anima-adapters-lycoris/bench/bypass_vs_rebuild.py
"""

import copy
import time

import torch
from torch import nn

from anima_core.plugin_host import make_host

TOKENS, WIDTH, REPEATS = 1024, 2048, 5


def step_seconds(options: dict, base: nn.Module, x: torch.Tensor) -> float:
    spec = make_host(strict=True).registry.spec("adapter", options["type"])
    model = copy.deepcopy(base)
    adapter = spec.build(spec.options.model_validate({"targets": [".*"], **options}))
    adapter.inject(model)
    params = [p for g in adapter.get_param_groups(0.0) for p in g["params"]]
    times = []
    for _ in range(REPEATS + 1):
        start = time.perf_counter()
        model(x).square().mean().backward()
        times.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
    return sorted(times[1:])[len(times[1:]) // 2]  # median, first call is warm-up


def main() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(WIDTH, WIDTH)).requires_grad_(False)
    x = torch.randn(TOKENS, WIDTH)
    print(f"{'variant':<22}{'bypass s':>10}{'rebuild s':>11}{'rebuild/bypass':>16}")
    for options in ({"type": "locon", "rank": 32}, {"type": "lokr", "rank": 32, "factor": 8},
                    {"type": "loha", "rank": 16}):
        on = step_seconds({**options, "bypass_mode": True}, base, x)
        off = step_seconds({**options, "bypass_mode": False}, base, x)
        label = f"{options['type']} r{options['rank']}"
        print(f"{label:<22}{on:>10.4f}{off:>11.4f}{off / on:>16.2f}")


if __name__ == "__main__":
    main()
