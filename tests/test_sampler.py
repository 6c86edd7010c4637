"""HeadSampler: probabilities, reproducibility, checkpointable state, weight validation."""
import collections

import pytest
import torch

from hydravit.training.sampler import HeadSampler, normalize_weights

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
