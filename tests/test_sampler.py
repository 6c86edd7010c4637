"""HeadSampler: probabilities, reproducibility, checkpointable state, weight validation."""
import collections

import pytest
import torch

from hydravit.training.sampler import HeadSampler, normalize_weights, split_strata

DRAWS = 20000


def _frequencies(sampler: HeadSampler, draws: int = DRAWS) -> dict:
    counts = collections.Counter(sampler.sample(draws))
    return {k: counts[k] / draws for k in sampler.heads}


def test_uniform_frequencies_match():
    heads = list(range(3, 13))
    freqs = _frequencies(HeadSampler(heads, seed=1))
    # std of one frequency is sqrt(.1 * .9 / 20000) ~ .0021: .011 is > 5 sigma
    assert all(abs(f - 0.1) < 0.011 for f in freqs.values()), freqs


def test_weighted_frequencies_match_normalized_weights():
    sampler = HeadSampler([3, 6, 12], weights=[1, 2, 7], seed=3)
    assert sampler.probs == pytest.approx([0.1, 0.2, 0.7])
    freqs = _frequencies(sampler)
    for k, p in zip([3, 6, 12], [0.1, 0.2, 0.7], strict=True):
        assert abs(freqs[k] - p) < 0.017, freqs  # 5 sigma at p=.7


def test_zero_weight_is_never_drawn():
    assert 6 not in HeadSampler([3, 6, 12], weights=[1, 0, 1], seed=0).sample(2000)


def test_percentages_and_fractions_are_the_same_distribution():
    assert normalize_weights([10, 20, 70], 3) == pytest.approx(normalize_weights([0.1, 0.2, 0.7], 3))


def test_same_seed_same_sequence_other_seed_differs():
    a = HeadSampler(range(3, 13), seed=7).sample(200)
    b = HeadSampler(range(3, 13), seed=7).sample(200)
    c = HeadSampler(range(3, 13), seed=8).sample(200)
    assert a == b
    assert a != c


def test_global_rng_untouched():
    before = torch.get_rng_state().clone()
    HeadSampler([3, 12], seed=0).sample(100)
    assert torch.equal(before, torch.get_rng_state())


def test_state_dict_resumes_the_sequence(tmp_path):
    sampler = HeadSampler(range(3, 13), weights=range(1, 11), seed=5)
    sampler.record(sampler.sample(37))
    path = tmp_path / 'sampler.pt'
    torch.save(sampler.state_dict(), path)
    expected = sampler.sample(50)

    restored = HeadSampler(range(3, 13), weights=range(1, 11), seed=123)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.sample(50) == expected
    assert restored.histogram() == sampler.histogram()
    assert sum(restored.counts) == 37


def test_state_dict_for_other_heads_is_refused():
    state = HeadSampler([3, 6, 12], seed=0).state_dict()
    with pytest.raises(ValueError, match='heads'):
        HeadSampler([3, 6], seed=0).load_state_dict(state)


@pytest.mark.parametrize('weights, needle', [
    ([1, 2], 'got 2 weights for 3'),
    ([1, -1, 1], '>= 0'),
    ([0, 0, 0], 'all zero'),
    ([1, float('nan'), 1], 'finite'),
])
def test_bad_weights_name_the_flag(weights, needle):
    with pytest.raises(ValueError, match='--weights') as info:
        normalize_weights(weights, 3)
    assert needle in str(info.value)


# --- several subnetworks per step -------------------------------------------------------------------------
HEADS = list(range(3, 13))


def _steps(policy: str, num: int, weights=None, steps: int = 4000) -> list:
    sampler = HeadSampler(HEADS, weights, seed=5)
    return [sampler.draw_step(num, policy) for _ in range(steps)]


@pytest.mark.parametrize('policy', ['random', 'sandwich', 'stratified', 'largest'])
def test_step_draws_are_distinct_and_largest_first(policy):
    for step in _steps(policy, 4, steps=500):
        assert len(step) == 4 and len(set(step)) == 4 and step == sorted(step, reverse=True)
        assert set(step) <= set(HEADS)


@pytest.mark.parametrize('policy', ['sandwich', 'stratified'])
def test_sandwich_and_stratified_always_hold_largest_and_smallest(policy):
    assert all(step[0] == 12 and step[-1] == 3 for step in _steps(policy, 4, steps=500))


def test_largest_policy_holds_the_largest_and_draws_the_rest_by_weight():
    weights = [1, 0, 1, 1, 1, 1, 1, 1, 8, 1]  # k=4 never; k=11 far more often than the others
    steps = _steps('largest', 2, weights)
    assert all(len(step) == 2 and step[0] == 12 for step in steps)
    counts = collections.Counter(step[1] for step in steps)
    assert counts[4] == 0 and set(counts) == {3, 5, 6, 7, 8, 9, 10, 11}
    assert counts[11] > 3 * max(counts[k] for k in (3, 5, 6, 7, 8, 9, 10))


def test_sandwich_middle_draws_follow_the_weights():
    weights = [1, 0, 0, 1, 1, 1, 1, 1, 8, 1]  # k=4, 5 never; k=11 far more often than the others
    counts = collections.Counter(k for step in _steps('sandwich', 3, weights) for k in step[1:-1])
    assert counts[4] == counts[5] == 0
    assert counts[11] > 3 * max(counts[k] for k in (6, 7, 8, 9, 10))


def test_stratified_draws_one_from_each_stratum():
    # middle 4..11 in 2 strata of 4: {4..7} and {8..11}; one draw from each
    steps = _steps('stratified', 4)
    for step in steps:
        middle = step[1:-1]
        assert len([k for k in middle if 4 <= k <= 7]) == 1 and len([k for k in middle if 8 <= k <= 11]) == 1
    freqs = collections.Counter(k for step in steps for k in step[1:-1])
    assert all(abs(freqs[k] / len(steps) - 0.25) < 0.04 for k in range(4, 12)), freqs  # uniform in each


def test_stratified_respects_weights_within_a_stratum():
    weights = [1, 0, 0, 1, 1, 1, 1, 1, 1, 1]  # 4 and 5 (low stratum) never
    steps = _steps('stratified', 4, weights)
    lows = collections.Counter(k for step in steps for k in step[1:-1] if k <= 7)
    assert set(lows) == {6, 7} and sum(lows.values()) == len(steps)


def test_random_policy_draws_by_weight_without_replacement():
    weights = [0, 0, 0, 0, 0, 0, 1, 2, 4, 8]
    counts = collections.Counter(k for step in _steps('random', 2, weights) for k in step)
    assert set(counts) == {9, 10, 11, 12}
    assert counts[9] < counts[10] < counts[11] < counts[12]


def test_split_strata_sizes_differ_by_at_most_one():
    assert split_strata([4, 5, 6, 7, 8, 9, 10], 3) == [[4, 5, 6], [7, 8], [9, 10]]
    assert split_strata([4, 5], 0) == []
    with pytest.raises(ValueError):
        split_strata([4], 2)


@pytest.mark.parametrize('num, policy, weights, message', [
    (11, 'random', None, '--subnets-per-step: 11 distinct subnetworks per step, but --heads has only 10'),
    (0, 'random', None, '--subnets-per-step: must be >= 1, got 0'),
    (1, 'sandwich', None, '--subnet-policy sandwich: needs --subnets-per-step >= 2'),
    (1, 'largest', None, '--subnet-policy largest: needs --subnets-per-step >= 2 (the largest head count every '
                         'step)'),
    (3, 'largest', [1, 0, 0, 0, 0, 0, 0, 0, 0, 1], '--weights: --subnet-policy largest draws 2 distinct head '
                                                   'count(s) from [3, 4, 5, 6, 7, 8, 9, 10, 11]'),
    (3, 'random', [0, 0, 0, 0, 0, 0, 0, 0, 1, 1], '--weights: --subnet-policy random draws 3'),
    (3, 'stratified', [1, 0, 0, 0, 0, 0, 0, 0, 0, 1], '--weights: --subnet-policy stratified draws 1'),
    (2, 'bogus', None, '--subnet-policy: one of random, sandwich, stratified, largest'),
])
def test_impossible_step_draws_are_refused_naming_the_flag(num, policy, weights, message):
    with pytest.raises(ValueError) as info:
        HeadSampler(HEADS, weights).check_step(num, policy)
    assert str(info.value).startswith(message), str(info.value)


def test_step_draws_resume_from_the_sampler_state():
    a = HeadSampler(HEADS, seed=9)
    [a.draw_step(3, 'sandwich') for _ in range(7)]
    b = HeadSampler(HEADS, seed=9)
    b.load_state_dict(a.state_dict())
    assert [a.draw_step(3, 'sandwich') for _ in range(20)] == [b.draw_step(3, 'sandwich') for _ in range(20)]
