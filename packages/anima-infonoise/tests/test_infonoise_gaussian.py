"""The velocity-MSE → entropy-rate conversion, pinned on data whose answer is known in closed form.

For x0 ~ N(0, s²·I) and x_t = (1 − t)·x0 + t·ε, the Bayes-optimal velocity v̂ = E[ε − x0 | x_t] is linear in
x_t, its error per dimension is mmse_v(t) = s² / ((1 − t)²·s² + t²), and the conditional entropy rate is
−dH(x0 | x_t)/d log σ = mmse_x0(σ)/σ² = s² / (s² + σ²) with σ = t / (1 − t) (README, "Derivation"). The sampler
is fed the real per-sample losses of that optimal denoiser; its profile must match the closed form.
"""

import functools
import math

import torch
from anima_infonoise import profile as P
from infonoise_helpers import make

S = 0.7  # data std
DIMS = 256


def optimal_velocity_losses(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-sample velocity MSE of the Bayes-optimal predictor on Gaussian data (real draws, not the formula)."""
    t = t.to(torch.float64)[:, None]
    x0 = S * torch.randn(len(t), DIMS, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), DIMS, generator=g, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * eps
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    v_hat = (t - (1 - t) * S ** 2) * x_t / var  # E[ε | x_t] − E[x0 | x_t]
    return (v_hat - (eps - x0)).pow(2).mean(dim=1)


def closed_form_bin_means(edges: torch.Tensor) -> torch.Tensor:
    """s²/(s² + σ²) averaged over each bin uniformly in log σ: F(x) = x − ½·ln(s² + e^{2x}) is its antiderivative."""
    f = edges - 0.5 * torch.log(S ** 2 + torch.exp(2 * edges))
    return (f[1:] - f[:-1]) / (edges[1:] - edges[:-1])


@functools.lru_cache(maxsize=None)  # shared, read-only
def fed_sampler(per_bin: int = 2000):
    s = make(bins=16, fifo_size=per_bin, min_per_bin=per_bin, warmup_steps=1, refresh_every=1)
    g = torch.Generator().manual_seed(0)
    edges = s.bins.edges
    # log σ on an even grid inside each bin, so a bin's mean is the bin average of the profile (midpoint rule)
    inside = (torch.arange(per_bin, dtype=torch.float64) + 0.5) / per_bin
    log_sigma = (edges[:-1, None] + s.bins.width * inside[None, :]).flatten()
    t = torch.sigmoid(log_sigma)
    losses = optimal_velocity_losses(t, g)
    s.record(t, losses)
    s.maybe_refresh(1)
    return s, t, losses


def test_the_estimated_profile_matches_the_closed_form_entropy_rate():
    s, _, _ = fed_sampler()
    assert s.status()["last_refresh_status"] == "ok"
    expected = closed_form_bin_means(s.bins.edges)
    torch.testing.assert_close(s.profile(), expected, rtol=0.01, atol=0.0)


def test_the_per_sample_losses_match_the_closed_form_velocity_mmse():
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64).repeat_interleave(4000)
    mean = optimal_velocity_losses(t, g).view(5, -1).mean(dim=1)
    tt = t.view(5, -1)[:, 0]
    torch.testing.assert_close(mean, S ** 2 / ((1 - tt) ** 2 * S ** 2 + tt ** 2), rtol=0.01, atol=0.0)


def test_the_cdf_is_the_gated_closed_form_profile():
    s, _, _ = fed_sampler()
    centres = s.bins.centres
    density = P.gated(closed_form_bin_means(s.bins.edges), centres, 0.15, 3.0)
    expected = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(density / density.sum(), 0)])
    assert float((s.cdf - expected).abs().max()) < 0.01


def test_the_uncorrected_reference_feed_is_far_from_the_entropy_rate():
    """Control: the reference divides the raw velocity MSE by σ², which misses the factor t² (x0 − x̂0 =
    −t·(v − v̂)); the same losses then give a profile off by 1/t², hundreds of times too large at low noise."""
    s, t, losses = fed_sampler(per_bin=500)
    bins = s.bins.index(t)
    sigma = s.bins.centres
    uncorrected = torch.stack([losses[bins == k].mean() for k in range(s.options.bins)]) / sigma ** 2
    expected = closed_form_bin_means(s.bins.edges)
    ratio = uncorrected / expected
    assert float(ratio.max()) > 100 and float(ratio.min()) < 1.5
    t_centre = sigma / (1 + sigma)
    torch.testing.assert_close(ratio * t_centre ** 2, torch.ones_like(ratio), rtol=0.25, atol=0.0)


def test_entropy_rate_conversion_is_exact_for_the_closed_forms():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    sigma = t / (1 - t)
    mmse_v = S ** 2 / ((1 - t) ** 2 * S ** 2 + t ** 2)
    torch.testing.assert_close(P.entropy_rate_from_velocity_mse(t, mmse_v), S ** 2 / (S ** 2 + sigma ** 2))
    mmse_x0 = S ** 2 * sigma ** 2 / (S ** 2 + sigma ** 2)  # the paper's quantity, at the same σ
    torch.testing.assert_close(P.entropy_rate_from_velocity_mse(t, mmse_v), mmse_x0 / sigma ** 2)
    assert math.isclose(float(P.entropy_rate_from_velocity_mse(torch.tensor(0.5), torch.tensor(2.0))), 0.5)
