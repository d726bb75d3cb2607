"""The InfoNoise timestep sampler: learns a per-bin entropy-rate profile from the training losses and samples t
from the gated profile once every bin is measured.

State machine (status ``last_refresh_status``):
``not_refreshed_yet`` → (every M optimizer steps after N_warm) ``skipped_bins_not_full`` until each bin holds
N_min losses → ``ok`` (CDF ready) or a degraded refresh, ``mse_collapsed`` / ``normalizer_too_small``, which drops
the CDF so sampling falls back to the base distribution until a later refresh succeeds.

Records are kept per process until the next ``maybe_refresh`` (called by every process after each optimizer
step), where all processes exchange them and apply them in rank order: every process holds the same state and
samples from the same CDF.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any

import torch

from anima_infonoise import profile as P
from anima_infonoise import ranks
from anima_infonoise.options import InfoNoiseOptions

STATE_FORMAT = "anima-infonoise"
STATE_VERSION = 1
T_MIN, T_MAX = 1e-4, 1.0 - 1e-4  # as core's samplers


class InfoNoiseWarning(UserWarning):
    """Cold starts and a first refresh that left no distribution."""


def _build_base(options):
    from anima_core.builtins import timesteps

    specs = {s.name: s for s in (timesteps.UNIFORM, timesteps.LOGIT_NORMAL, timesteps.MODE)}
    return specs[options.type].build(options)


class InfoNoiseSampler:
    def __init__(self, options: InfoNoiseOptions, total_steps: int | None = None) -> None:
        self.options = options
        self.bins = P.Bins(options.bins, options.t_min, options.t_max)
        self.warmup_steps = options.resolved_warmup(total_steps)
        self.base = _build_base(options.base)
        self._edges = self.bins.edges
        self._centres = self.bins.centres
        self._cold_start()

    def _cold_start(self) -> None:
        k, b = self.options.bins, self.options.fifo_size
        self.fifos: list[deque[float]] = [deque(maxlen=b) for _ in range(k)]
        self.ema = torch.zeros(k, dtype=torch.float64)
        self.ema_ready = False
        self.cdf: torch.Tensor | None = None
        self.internal_step = 0
        self.last_refresh_status = "not_refreshed_yet"
        self.refresh_attempts = 0
        self.refresh_degraded_count = 0
        self.warned_cold_start = False
        self.pending: list[tuple[list[int], list[float]]] = []

    # -- counts and profile -----------------------------------------------------------------------------------
    @property
    def counts(self) -> list[int]:
        return [len(f) for f in self.fifos]

    @property
    def cdf_ready(self) -> bool:
        return self.cdf is not None

    def profile(self) -> torch.Tensor:
        """The current entropy-rate estimate per bin (the EMA of the bin means)."""
        return self.ema.clone()

    # -- sampling ---------------------------------------------------------------------------------------------
    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        n, eps = batch_size, self.options.explore
        if self.cdf is None:
            t = self.base.sample(n, generator=generator).to(torch.float64)
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            t = P.t_of_log_sigma(P.inverse_cdf(u, self.cdf, self._edges))
        if eps > 0:
            pick = torch.rand(n, generator=generator, dtype=torch.float64) < eps
            t = torch.where(pick, self._explore(n, generator), t)
        return t.clamp(T_MIN, T_MAX).to(torch.float32)

    def _explore(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """t uniform in log σ over the bins that still lack N_min losses (all bins once every one has them):
        the exploration share goes where the base distribution does not reach, so the first refresh comes after
        at most K·N_min/ε samples whatever the base."""
        short = [k for k, c in enumerate(self.counts) if c < self.options.min_per_bin]
        candidates = torch.tensor(short or range(self.options.bins), dtype=torch.long)
        which = candidates[(torch.rand(n, generator=generator, dtype=torch.float64) * len(candidates)).long()
                           .clamp(max=len(candidates) - 1)]
        inside = torch.rand(n, generator=generator, dtype=torch.float64)
        return P.t_of_log_sigma(self._edges[which] + inside * self.bins.width)

    # -- learning ---------------------------------------------------------------------------------------------
    def record(self, t: torch.Tensor, raw_mse: torch.Tensor) -> None:
        """Keep each sample's entropy-rate estimate (from its unweighted velocity MSE) until the next refresh
        check; non-finite losses are dropped (one NaN would poison its bin's mean for B samples)."""
        t, raw_mse = t.detach().cpu().flatten(), raw_mse.detach().cpu().flatten()
        keep = torch.isfinite(raw_mse) & torch.isfinite(t)
        if not bool(keep.any()):
            return
        t, raw_mse = t[keep], raw_mse[keep]
        rate = P.entropy_rate_from_velocity_mse(t, raw_mse)
        self.pending.append((self.bins.index(t).tolist(), rate.tolist()))

    def _apply_pending(self) -> None:
        for records in ranks.gather(self.pending):
            for bins, rates in records:
                for k, r in zip(bins, rates):
                    self.fifos[k].append(r)
                self.internal_step += 1
        self.pending = []

    def maybe_refresh(self, global_step: int) -> None:
        self._apply_pending()
        if global_step < self.warmup_steps or global_step % self.options.refresh_every != 0:
            return
        if min(self.counts) < self.options.min_per_bin:
            self.last_refresh_status = "skipped_bins_not_full"
            return
        self._refresh()
        if self.cdf is None and not self.warned_cold_start:
            self.warned_cold_start = True
            warnings.warn(f"InfoNoise: the refresh at step {global_step} gave no distribution "
                          f"({self.last_refresh_status}); sampling from the base distribution until a refresh "
                          f"succeeds", InfoNoiseWarning, stacklevel=2)
        self._check_ranks_agree(global_step)

    def _refresh(self) -> None:
        o = self.options
        self.refresh_attempts += 1
        means = torch.tensor([sum(f) / len(f) for f in self.fifos], dtype=torch.float64)
        # β weights the new value; the first update starts the EMA at the means (no pull towards 0).
        self.ema = means if not self.ema_ready else (1 - o.ema_beta) * self.ema + o.ema_beta * means
        self.ema_ready = True
        if not float(self.ema.max()) >= P.TINY:
            self._degraded("mse_collapsed")
            return
        c = P.pivot(self.ema, self._centres, o.gate_pivot, o.onset_fraction)
        cdf = P.cdf_of(P.gated(self.ema, self._centres, c, o.gate_power), self.bins.width)
        if cdf is None:
            self._degraded("normalizer_too_small")
            return
        self.cdf = cdf
        self.last_refresh_status = "ok"

    def _degraded(self, status: str) -> None:
        self.last_refresh_status = status
        self.refresh_degraded_count += 1
        self.cdf = None

    def _check_ranks_agree(self, global_step: int) -> None:
        """Cheap insurance at refresh steps only: a process sampling from another CDF is a bug, never noise."""
        mine = None if self.cdf is None else self.cdf.tolist()
        everyone = ranks.gather(mine)
        if any(other != everyone[0] for other in everyone[1:]):
            raise RuntimeError(f"InfoNoise: processes hold different distributions after the refresh at step "
                               f"{global_step}")

    # -- reporting and state ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"kind": "infonoise", "cdf_ready": self.cdf_ready, "last_refresh_status": self.last_refresh_status,
                "refresh_attempts": self.refresh_attempts, "refresh_degraded_count": self.refresh_degraded_count,
                "internal_step": self.internal_step}

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and numbers only (core reads states back with ``weights_only=True``)."""
        o = self.options
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "bins": o.bins, "fifo_size": o.fifo_size,
                "t_min": o.t_min, "t_max": o.t_max, "fifos": [list(f) for f in self.fifos],
                "ema": self.ema.tolist(), "ema_ready": self.ema_ready,
                "cdf": None if self.cdf is None else self.cdf.tolist(), "internal_step": self.internal_step,
                "last_refresh_status": self.last_refresh_status, "refresh_attempts": self.refresh_attempts,
                "refresh_degraded_count": self.refresh_degraded_count, "warned_cold_start": self.warned_cold_start,
                "pending": [[list(b), list(r)] for b, r in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; anything that does not fit (another version or binning, a damaged state) is a
        cold start with a warning, never an error."""
        problem = self._mismatch(state)
        if problem is None:
            try:
                self._restore(state)
                return
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                problem = f"unreadable state ({type(exc).__name__}: {exc})"
        self._cold_start()
        warnings.warn(f"InfoNoise: cold start, the saved sampler state is not used: {problem}", InfoNoiseWarning,
                      stacklevel=2)

    def _mismatch(self, state: Any) -> str | None:
        if not isinstance(state, dict):
            return f"expected a mapping, found {type(state).__name__}"
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            return (f"state format {state.get('format')!r} version {state.get('version')!r}, this sampler reads "
                    f"{STATE_FORMAT!r} version {STATE_VERSION}")
        o = self.options
        for key in ("bins", "fifo_size", "t_min", "t_max"):
            if state.get(key) != getattr(o, key):
                return f"{key} was {state.get(key)!r}, the options say {getattr(o, key)!r}"
        return None

    def _restore(self, state: dict[str, Any]) -> None:
        o = self.options
        fifos = [deque((float(v) for v in f), maxlen=o.fifo_size) for f in state["fifos"]]
        ema = torch.tensor([float(v) for v in state["ema"]], dtype=torch.float64)
        cdf = None if state["cdf"] is None else torch.tensor([float(v) for v in state["cdf"]], dtype=torch.float64)
        if len(fifos) != o.bins or ema.shape != (o.bins,) or (cdf is not None and cdf.shape != (o.bins + 1,)):
            raise ValueError("array sizes do not match the bins")
        # Every process loads the same state; a record kept but not yet exchanged belongs to rank 0 alone.
        pending = [([int(k) for k in b], [float(r) for r in rs]) for b, rs in state["pending"]]
        self.fifos, self.ema, self.cdf = fifos, ema, cdf
        self.ema_ready = bool(state["ema_ready"])
        self.internal_step = int(state["internal_step"])
        self.last_refresh_status = str(state["last_refresh_status"])
        self.refresh_attempts = int(state["refresh_attempts"])
        self.refresh_degraded_count = int(state["refresh_degraded_count"])
        self.warned_cold_start = bool(state["warned_cold_start"])
        self.pending = pending if ranks.rank() == 0 else []


def build(options: InfoNoiseOptions, total_steps: int | None = None) -> InfoNoiseSampler:
    return InfoNoiseSampler(options, total_steps)
