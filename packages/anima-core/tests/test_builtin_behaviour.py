"""What each built-in computes, pinned beyond the conformance kit."""

import math

import pytest
import torch
import torch.nn.functional as F

from anima_core.builtins import schedulers
from anima_core.builtins.timesteps import LogitNormalOptions, ModeOptions, UniformOptions
from anima_core.objective.loss_weighting import loss_weight
from anima_core.objective.noise import make_noise
from anima_core.testing import installed_registry


def build(kind, name, **options):
    spec = installed_registry().spec(kind, name)
    return spec.build(spec.options.model_validate({"type": name, **options}))


def test_mse_is_bit_identical_to_torch():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 16, 1, 4, 4, generator=g), torch.randn(2, 16, 1, 4, 4, generator=g)
    assert torch.equal(build("loss", "mse").compute(a, b, torch.rand(2)), F.mse_loss(a, b, reduction="none"))


def test_huber_branches_with_strict_less_than():
    huber = build("loss", "huber", delta=0.5)
    pred = torch.tensor([0.0, 0.25, 0.5, 2.0])
    out = huber.compute(pred, torch.zeros(4), torch.rand(4))
    expected = torch.tensor([0.0, 0.5 * 0.25 ** 2, 0.5 * (0.5 - 0.25), 0.5 * (2.0 - 0.25)])
    torch.testing.assert_close(out, expected)
    assert installed_registry().spec("loss", "huber").options().delta == 0.15


def _lrs(name, steps, lrs=(1.0,), total=10, **options):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])
    spec = installed_registry().spec("lr_scheduler", name)
    sched = spec.build(spec.options.model_validate({"type": name, **options}), opt, total)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_cosine_warms_up_linearly_then_decays_to_the_absolute_floor_for_every_group():
    lrs = _lrs("cosine", 12, lrs=(1.0, 0.5), total=10, warmup_steps=2, eta_min=0.1)
    assert [round(r[0], 6) for r in lrs[:3]] == [0.0, 0.5, 1.0]
    assert all(a[0] >= b[0] for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[10] == pytest.approx([0.1, 0.1]) and lrs[11] == pytest.approx([0.1, 0.1])
    assert lrs[6][1] == pytest.approx(0.1 + (0.5 - 0.1) * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_constant_with_warmup():
    assert [r[0] for r in _lrs("constant", 6, lrs=(0.2,), warmup_steps=4)] == pytest.approx(
        [0.0, 0.05, 0.1, 0.15, 0.2, 0.2])


def test_cosine_with_restarts_uses_a_float_period_multiplier():
    lrs = [r[0] for r in _lrs("cosine_with_restarts", 12, total=100, period=2, period_mult=1.5)]
    # cycles of 2, 3, 4.5 steps: restarts (lr back to 1.0) at steps 0, 2 and 5
    assert [i for i, lr in enumerate(lrs) if lr == pytest.approx(1.0)] == [0, 2, 5]
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert schedulers.restarts_factor(9, 0, 2, 1.5, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 4.5)))


def _draw(options_cls, n=20000, **options):
    spec = installed_registry().spec("timestep_sampler", options_cls.model_fields["type"].default)
    sampler = spec.build(options_cls(**options), total_steps=100)
    return sampler.sample(n, generator=torch.Generator().manual_seed(0))


def test_logit_normal_defaults_are_symmetric_and_shift_moves_mass_to_high_noise():
    base = _draw(LogitNormalOptions)
    assert base.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (base.logit().std().item()) == pytest.approx(1.0, abs=0.03)
    shifted = _draw(LogitNormalOptions, shift=3.0)
    # shift(3, u) is monotone: the median moves from 0.5 to 3·0.5 / (1 + 2·0.5) = 0.75
    assert shifted.median().item() == pytest.approx(0.75, abs=0.01)


def test_uniform_mix_prob_one_gives_uniform_samples():
    mixed = _draw(LogitNormalOptions, uniform_mix_prob=1.0, std=0.1)
    assert mixed.std().item() == pytest.approx(1 / math.sqrt(12), abs=0.01)


def test_mode_sampling_follows_sd3_density():
    t = _draw(ModeOptions, mode_scale=0.0)
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)  # scale 0 is uniform
    heavy = _draw(ModeOptions, mode_scale=1.29)
    assert (heavy.sub(0.5).abs() < 0.2).float().mean() > (t.sub(0.5).abs() < 0.2).float().mean()


def test_uniform_shift_matches_formula():
    t = _draw(UniformOptions, n=5, shift=2.0)
    u = torch.rand(5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, (2 * u / (1 + u)).clamp(1e-4, 1 - 1e-4))


@pytest.mark.parametrize("name", ["euler", "er_sde"])
def test_samplers_with_the_exact_denoiser_reproduce_the_data_distribution(name):
    """For x0 ~ N(0, s²) the optimal denoiser at x_σ = (1−σ)x0 + σε is E[x0|x] = (1−σ)s²/((1−σ)²s² + σ²)·x.
    Integrating from pure noise with it must give samples of std s (both the ODE and the SDE solver)."""
    from anima_core.samplers import simple_sigmas

    s = 0.5

    def denoise(x, sigma):
        sig = sigma.view(-1, 1)
        return (1 - sig) * s * s / ((1 - sig) ** 2 * s * s + sig ** 2) * x

    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))

    def std_after(steps):
        out = build("inference_sampler", name).sample(denoise, x, simple_sigmas(steps, shift=1.0),
                                                      generator=torch.Generator().manual_seed(1))
        return out.std().item()

    coarse, fine = std_after(10), std_after(100)
    assert fine == pytest.approx(s, rel=0.02)
    assert abs(fine - s) < abs(coarse - s)  # the error is discretisation: it shrinks with more steps


def test_er_sde_is_stochastic_and_euler_is_not():
    from anima_core.samplers import simple_sigmas

    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))

    def run(name, seed):
        return build("inference_sampler", name).sample(lambda y, sig: 0.3 * y, x.clone(), simple_sigmas(8),
                                                       generator=torch.Generator().manual_seed(seed))

    assert not torch.equal(run("er_sde", 1), run("er_sde", 2))
    assert torch.equal(run("euler", 1), run("euler", 2))


def test_simple_sigmas_match_comfyui_table():
    from anima_core.samplers import simple_sigmas

    sig = simple_sigmas(4, shift=3.0)
    table = [3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25)]
    torch.testing.assert_close(sig, torch.tensor([*table, 0.0]))


def test_loss_weighting_formulas():
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(loss_weight(t, "none"), torch.ones(3))
    snr = ((1 - t) / t) ** 2
    torch.testing.assert_close(loss_weight(t, "min_snr", min_snr_gamma=5.0), torch.clamp(5.0 / snr, max=1.0))
    torch.testing.assert_close(loss_weight(t, "detail_inv_t"), torch.tensor([5.0, 2.0, 1 / 0.9]))
    torch.testing.assert_close(loss_weight(torch.tensor([1e-6]), "detail_inv_t", detail_inv_t_max=3.0),
                               torch.tensor([3.0]))
    torch.testing.assert_close(loss_weight(t, "cosmap"), 2 / (math.pi * (1 - 2 * t + 2 * t * t)))
    capped = loss_weight(torch.tensor([0.01, 0.9]), "detail_inv_t", detail_inv_t_max=50, cap_ratio=2.0)
    assert capped.max() / capped.min() == pytest.approx(2.0)


def test_noise_kinds():
    lat = torch.zeros(4, 16, 1, 32, 32)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = make_noise(lat, generator=g())
    offset = make_noise(lat, "offset", offset=0.5, generator=g())
    per_channel_mean = (offset - plain).mean(dim=(2, 3, 4))
    assert per_channel_mean.std().item() == pytest.approx(0.5, rel=0.25)
    assert torch.allclose(offset - plain, (offset - plain)[..., :1, :1], atol=1e-6)  # constant per (b, c)
    pyramid = make_noise(lat, "pyramid", pyramid_discount=0.8, generator=g())
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-4)
    # low-frequency energy: 8×8-block means vary far more than for white noise
    assert F.avg_pool2d(pyramid[:, :, 0], 8).std() > 2 * F.avg_pool2d(plain[:, :, 0], 8).std()
    with pytest.raises(ValueError, match="unknown noise type"):
        make_noise(lat, "perlin")
