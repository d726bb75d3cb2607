"""The InfoNoise state machine on hand-fed losses: what the reference's test_infonoise.py and
test_timestep_sampler_resume.py pin, with anima-infonoise's fixes (β direction, σ² profile, pivot 0.15, warm-up
in optimizer steps, versioned state with cold start, bins filled by exploration)."""

import copy
import math
import warnings

import pytest
import torch
from anima_infonoise.options import InfoNoiseOptions
from anima_infonoise.sampler import STATE_VERSION, InfoNoiseSampler, InfoNoiseWarning
from infonoise_helpers import bin_centre_t, feed, make
from pydantic import ValidationError

STATUS_KEYS = {"kind", "cdf_ready", "last_refresh_status", "refresh_attempts", "refresh_degraded_count",
               "internal_step"}
FAST = dict(bins=8, warmup_steps=1, refresh_every=1, min_per_bin=1)


def peaked(sampler: InfoNoiseSampler, at: int) -> torch.Tensor:
    rate = torch.full((sampler.options.bins,), 1e-3, dtype=torch.float64)
    rate[at] = 1.0
    return rate


def ready(**options) -> InfoNoiseSampler:
    s = make(**{**FAST, **options})
    feed(s, peaked(s, s.options.bins // 2))
    s.maybe_refresh(1)
    assert s.cdf_ready
    return s


# -- EMA, profile, degraded states ------------------------------------------------------------------------------
@pytest.mark.parametrize("beta, new, check", [(0.9, 10.0, lambda v: v == pytest.approx(9.1, rel=1e-6)),
                                              (0.99, 100.0, lambda v: v >= 99.0),
                                              (0.01, 10.0, lambda v: v <= 2.0)])
def test_ema_beta_weights_the_new_value(beta, new, check):
    s = make(**FAST, fifo_size=1, ema_beta=beta)
    feed(s, 1.0)
    s.maybe_refresh(1)
    assert s.profile().tolist() == pytest.approx([1.0] * 8, rel=1e-6)  # the first update starts the EMA
    feed(s, new)
    s.maybe_refresh(2)
    assert all(check(v) for v in s.profile().tolist())


def test_all_zero_losses_collapse_and_fall_back_to_the_base_distribution():
    s = make(**FAST)
    feed(s, 0.0)
    with pytest.warns(InfoNoiseWarning, match="mse_collapsed"):
        s.maybe_refresh(1)
    assert s.status()["last_refresh_status"] == "mse_collapsed"
    assert s.cdf is None and s.status()["refresh_degraded_count"] == 1
    torch.testing.assert_close(s.sample(64, torch.Generator().manual_seed(0)),
                               _base_only(s).sample(64, torch.Generator().manual_seed(0)))


def _base_only(s: InfoNoiseSampler) -> InfoNoiseSampler:
    return InfoNoiseSampler(s.options, 1000)


def test_the_cold_start_warning_is_given_once():
    s = make(**FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            feed(s, 0.0)
            s.maybe_refresh(step)
    mine = [w for w in caught if issubclass(w.category, InfoNoiseWarning)]
    assert len(mine) == 1 and "mse_collapsed" in str(mine[0].message)
    assert s.status()["refresh_degraded_count"] == 5


def test_a_degraded_refresh_after_an_ok_one_drops_the_cdf():
    s = ready(ema_beta=1.0)
    feed(s, 0.0, repeats=1)
    s.fifos = [type(f)([0.0], maxlen=f.maxlen) for f in s.fifos]
    with pytest.warns(InfoNoiseWarning):
        s.maybe_refresh(2)
    assert s.status()["last_refresh_status"] == "mse_collapsed" and not s.cdf_ready


def test_normalizer_too_small_when_the_gate_removes_every_bin():
    s = make(**FAST, gate_pivot=1e15)  # (σ / c)³ ≤ 1e-36: the gated mass is below 1e-30
    feed(s, 1.0)
    with pytest.warns(InfoNoiseWarning, match="normalizer_too_small"):
        s.maybe_refresh(1)
    assert s.status()["last_refresh_status"] == "normalizer_too_small" and s.cdf is None
    assert s.status()["refresh_degraded_count"] == 1


def test_a_peaked_profile_gives_a_monotone_cdf_that_samples_the_peak():
    s = ready()
    cdf = s.cdf
    assert s.status()["last_refresh_status"] == "ok"
    assert cdf[0] == 0 and cdf[-1] == 1 and bool((cdf[1:] >= cdf[:-1]).all())
    peak = 4
    assert float(cdf[peak + 1] - cdf[peak]) > 0.9
    t = s.sample(20_000, torch.Generator().manual_seed(1))
    share = float((s.bins.index(t) == peak).double().mean())
    expected = (1 - s.options.explore) * float(cdf[peak + 1] - cdf[peak]) + s.options.explore / 8
    assert share == pytest.approx(expected, abs=0.02)


def test_samples_stay_in_the_open_interval_in_both_modes():
    s = make(**FAST, explore=0.5, t_min=1e-6, t_max=1 - 1e-6)
    for sampler in (s, ready(explore=0.5, t_min=1e-6, t_max=1 - 1e-6)):
        t = sampler.sample(50_000, torch.Generator().manual_seed(2))
        assert t.dtype == torch.float32 and t.shape == (50_000,)
        assert bool(((t > 0) & (t < 1)).all())


def test_cdf_sampling_ignores_the_base_distribution():
    a = ready(base={"type": "logit_normal", "shift": 1.0})
    b = ready(base={"type": "logit_normal", "shift": 3.0})
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(a.sample(256, ga), b.sample(256, gb), rtol=0, atol=0)
    cold_a, cold_b = make(**FAST, base={"type": "logit_normal", "shift": 1.0}), \
        make(**FAST, base={"type": "logit_normal", "shift": 3.0})
    assert not torch.equal(cold_a.sample(256, torch.Generator().manual_seed(3)),
                           cold_b.sample(256, torch.Generator().manual_seed(3)))


# -- gate pivot ------------------------------------------------------------------------------------------------
def test_default_pivot_is_0_15_and_gates_low_sigma():
    assert InfoNoiseOptions().gate_pivot == 0.15
    s = make(**FAST)
    feed(s, 1.0)  # a flat profile: the gate alone shapes the CDF
    s.maybe_refresh(1)
    centres = s.bins.centres
    mass = s.cdf[1:] - s.cdf[:-1]
    gate = centres ** 3 / (centres ** 3 + 0.15 ** 3)
    torch.testing.assert_close(mass, gate / gate.sum())


def test_pivot_zero_takes_the_dynamic_rule():
    s = make(**FAST, gate_pivot=0.0, onset_fraction=0.01)
    rate = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.02, 0.011, 0.001, 0.0001], dtype=torch.float64)
    feed(s, rate)
    s.maybe_refresh(1)
    assert s.status()["last_refresh_status"] == "ok"
    c = float(s.bins.centres[5])  # the last bin with profile ≥ 1% of the maximum
    centres = s.bins.centres
    density = s.profile() * centres ** 3 / (centres ** 3 + c ** 3)
    torch.testing.assert_close(s.cdf[1:] - s.cdf[:-1], density / density.sum())


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5])
def test_an_invalid_onset_fraction_is_refused(p):
    with pytest.raises(ValidationError):
        InfoNoiseOptions(onset_fraction=p)


def test_t_range_must_be_ordered_and_a_bin_able_to_fill():
    with pytest.raises(ValidationError, match="t_min"):
        InfoNoiseOptions(t_min=0.9, t_max=0.1)
    with pytest.raises(ValidationError, match="fifo_size"):
        InfoNoiseOptions(min_per_bin=9, fifo_size=8)


# -- warm-up, refresh period, bins gate -------------------------------------------------------------------------
def test_auto_warmup_rule():
    assert make(total_steps=10_000).warmup_steps == 2000
    assert make(total_steps=100).warmup_steps == 200
    assert make(total_steps=None).warmup_steps == 1000
    assert make(total_steps=10_000, warmup_steps=7).warmup_steps == 7


def test_warmup_counts_optimizer_steps_not_records():
    s = make(bins=8, warmup_steps=50, refresh_every=1, min_per_bin=1)
    for _ in range(200):  # 200 micro-batches inside 49 optimizer steps (grad accumulation)
        feed(s, 1.0)
    s.maybe_refresh(49)
    assert s.status()["internal_step"] == 200 and s.status()["last_refresh_status"] == "not_refreshed_yet"
    s.maybe_refresh(50)
    assert s.cdf_ready


def test_refreshes_only_every_m_steps():
    s = make(bins=8, warmup_steps=10, refresh_every=4, min_per_bin=1)
    feed(s, 1.0)
    for step in (10, 11, 13, 14, 15):
        s.maybe_refresh(step)
        assert not s.cdf_ready, step
    s.maybe_refresh(16)
    assert s.cdf_ready and s.status()["refresh_attempts"] == 1


def test_bins_not_full_skips_the_refresh():
    s = make(**{**FAST, "min_per_bin": 3})
    feed(s, 1.0, repeats=2)
    s.maybe_refresh(1)
    assert s.status()["last_refresh_status"] == "skipped_bins_not_full" and not s.cdf_ready
    assert s.status()["refresh_attempts"] == 0
    feed(s, 1.0)
    s.maybe_refresh(2)
    assert s.cdf_ready


@pytest.mark.parametrize("base", [{"type": "uniform"}, {"type": "logit_normal"},
                                  {"type": "logit_normal", "shift": 3.0}, {"type": "logit_normal", "shift": 1 / 3},
                                  {"type": "logit_normal", "uniform_mix_prob": 0.3}, {"type": "mode"}])
def test_every_base_fills_every_bin_and_activates(base):
    """The reference's failure: under logit-normal (shift 3) the end bins never fill. With ε of every batch drawn
    log-uniformly over the bins still short of N_min, all are full after at most K·N_min/ε samples."""
    o = InfoNoiseOptions(base=base)
    s = InfoNoiseSampler(o, total_steps=1000)
    g = torch.Generator().manual_seed(4)
    needed = o.bins * o.min_per_bin / o.explore  # samples for the expected end-bin count to reach N_min
    steps, batch = 0, 4
    while not s.cdf_ready:
        t = s.sample(batch, g)
        assert bool(((t > 0) & (t < 1)).all())
        s.record(t, torch.ones(batch))
        steps += 1
        s.maybe_refresh(steps)
        assert steps < 2000, s.counts
    assert min(s.counts) >= o.min_per_bin
    # the bound of the README: the first refresh after N_warm at which K·N_min/ε samples have been seen
    assert steps <= max(s.warmup_steps, math.ceil(needed / batch)) + o.refresh_every
    assert steps % o.refresh_every == 0 and steps >= s.warmup_steps


def test_without_exploration_a_shifted_base_never_fills_the_low_noise_bins():
    """The control: the reference's behaviour, which the exploration share fixes."""
    s = make(explore=0.0, base={"type": "logit_normal", "shift": 3.0})
    g = torch.Generator().manual_seed(5)
    for step in range(1, 1001):
        s.record(s.sample(4, g), torch.ones(4))
        s.maybe_refresh(step)
    assert not s.cdf_ready and s.status()["last_refresh_status"] == "skipped_bins_not_full"
    assert s.counts[0] == 0


# -- records ----------------------------------------------------------------------------------------------------
def test_partial_empty_and_non_finite_batches():
    s = make(**FAST)
    s.record(torch.empty(0), torch.empty(0))  # every sample of the batch was a regularisation image
    s.record(torch.tensor([0.5, 0.5]), torch.tensor([float("nan"), 1.0]))
    s.record(torch.tensor([0.5]), torch.tensor([float("inf")]))
    s.maybe_refresh(0)
    assert sum(s.counts) == 1 and s.status()["internal_step"] == 1


def test_records_go_to_the_bin_of_their_sigma_and_the_fifo_keeps_the_newest():
    s = make(**FAST, fifo_size=3)
    t = bin_centre_t(s)
    for value in range(5):
        s.record(t[2:3], torch.tensor([float(value)]))
    s.record(torch.tensor([1e-7, 1 - 1e-7]), torch.ones(2))  # beyond the range: the end bins
    s.maybe_refresh(0)
    assert s.counts == [1, 0, 3, 0, 0, 0, 0, 1]
    factor = (1 - float(t[2])) ** 2
    assert list(s.fifos[2]) == pytest.approx([2 * factor, 3 * factor, 4 * factor])


def test_status_has_exactly_the_six_keys():
    s = ready()
    status = s.status()
    assert set(status) == STATUS_KEYS
    assert status["kind"] == "infonoise" and status["cdf_ready"] is True
    assert status["refresh_attempts"] == 1 and status["internal_step"] == 1


# -- state ------------------------------------------------------------------------------------------------------
def _load(s: InfoNoiseSampler, state) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.load_state_dict(state)
    return [w for w in caught if issubclass(w.category, InfoNoiseWarning)]


def test_state_round_trips_warm_and_cold_and_sampling_continues_identically():
    for source in (make(**FAST), ready(fifo_size=5)):
        feed(source, 0.5, repeats=7)
        source.pending.append(([1], [0.25]))  # a record not yet exchanged is saved too
        state = copy.deepcopy(source.state_dict())
        assert state["version"] == STATE_VERSION
        clone = make(**{**FAST, "fifo_size": source.options.fifo_size})
        assert _load(clone, state) == []
        assert clone.state_dict() == source.state_dict()
        assert all(f.maxlen == source.options.fifo_size for f in clone.fifos)  # FIFO length survives
        for step in (2, 3):
            feed(source, 0.3)
            feed(clone, 0.3)
            source.maybe_refresh(step)
            clone.maybe_refresh(step)
            ga, gb = torch.Generator().manual_seed(step), torch.Generator().manual_seed(step)
            torch.testing.assert_close(source.sample(64, ga), clone.sample(64, gb), rtol=0, atol=0)
        assert clone.state_dict() == source.state_dict()


def test_state_survives_torch_save_with_weights_only(tmp_path):
    s = ready()
    torch.save({"timestep_sampler": s.state_dict()}, tmp_path / "optim.pt")
    back = torch.load(tmp_path / "optim.pt", weights_only=True)["timestep_sampler"]
    clone = make(**FAST)
    assert _load(clone, back) == [] and clone.state_dict() == s.state_dict()


@pytest.mark.parametrize("change, what", [({"version": 2}, "version"), ({"version": None}, "version"),
                                          ({"format": "other"}, "format"), ({"bins": 16}, "bins"),
                                          ({"fifo_size": 99}, "fifo_size"), ({"t_min": 0.01}, "t_min")])
def test_a_mismatched_state_is_a_cold_start_with_a_warning(change, what):
    state = {**ready().state_dict(), **change}
    s = make(**FAST)
    feed(s, 1.0)
    s.maybe_refresh(1)
    caught = _load(s, state)
    assert len(caught) == 1 and what in str(caught[0].message)
    assert not s.cdf_ready and s.status()["internal_step"] == 0 and float(s.profile().abs().sum()) == 0.0
    assert s.counts == [0] * 8 and s.status()["last_refresh_status"] == "not_refreshed_yet"


def test_the_reference_v2_state_layout_is_a_cold_start():
    reference = {"__version__": 2, "K": 8, "B": 256, "fifo": [[1.0]] * 8, "mse_ema": [0.0] * 8,
                 "n_count": [1] * 8, "cdf_values": None, "internal_step": 3}
    s = make(**FAST)
    caught = _load(s, reference)
    assert len(caught) == 1 and not s.cdf_ready and s.status()["internal_step"] == 0


@pytest.mark.parametrize("damage", [lambda st: st.pop("fifos"), lambda st: st.update(ema=[1.0]),
                                    lambda st: st.update(cdf="garbage"), lambda st: st.update(refresh_attempts="x"),
                                    lambda st: st.update(fifos=None)])
def test_a_corrupted_state_only_warns(damage):
    state = ready().state_dict()
    damage(state)
    s = make(**FAST)
    caught = _load(s, state)
    assert len(caught) == 1 and "cold start" in str(caught[0].message)
    assert not s.cdf_ready and s.status()["internal_step"] == 0


def test_not_a_mapping_is_a_cold_start():
    s = make(**FAST)
    assert len(_load(s, None)) == 1 and len(_load(s, [1, 2])) == 1


def test_bins_are_uniform_in_log_sigma_over_the_t_range():
    s = make()
    edges = s.bins.edges
    assert len(edges) == 33
    assert float(edges[0]) == pytest.approx(math.log(0.001 / 0.999))
    assert float(edges[-1]) == pytest.approx(math.log(0.999 / 0.001))
    torch.testing.assert_close(edges[1:] - edges[:-1], torch.full((32,), s.bins.width, dtype=torch.float64))
    centres = s.bins.centres
    torch.testing.assert_close(centres, torch.sqrt(torch.exp(edges[:-1]) * torch.exp(edges[1:])))


def test_exploration_goes_to_the_bins_still_short_of_n_min():
    s = make(bins=8, min_per_bin=2, explore=0.5, base={"type": "uniform"})
    t = bin_centre_t(s)
    for _ in range(2):
        s.record(t[:6], torch.ones(6))  # bins 0–5 full, 6 and 7 empty
    s.maybe_refresh(0)
    n = 40_000
    share = torch.bincount(s.bins.index(s.sample(n, torch.Generator().manual_seed(6))), minlength=8).double() / n
    base = torch.bincount(s.bins.index(make(bins=8, explore=0.0, base={"type": "uniform"})
                                       .sample(n, torch.Generator().manual_seed(7))), minlength=8).double() / n
    torch.testing.assert_close(share[:6], 0.5 * base[:6], rtol=0, atol=0.01)  # no exploration there
    torch.testing.assert_close(share[6:], 0.5 * base[6:] + 0.25, rtol=0, atol=0.01)  # ε split over bins 6, 7
