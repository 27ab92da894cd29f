import pytest

from megavlm import _C


def test_best_fit_decreasing_is_deterministic_and_fits():
    lengths = [300, 900, 120, 1024, 512, 700, 64, 100, 330]
    bins = _C.pack_best_fit(lengths, 1024)
    assert bins == _C.pack_best_fit(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert len(bins) == 4  # the lower bound: ceil(4050 / 1024)


def test_first_fit_keeps_order_within_bins():
    bins = _C.pack_first_fit([5, 3, 7, 2], 10)
    assert bins == [[0, 1, 3], [2]]


@pytest.mark.parametrize("fn", [_C.pack_best_fit, _C.pack_first_fit])
def test_bad_lengths_are_named(fn):
    with pytest.raises(ValueError, match="sample 1 has length 11"):
        fn([3, 11], 10)
    with pytest.raises(ValueError, match="budget"):
        fn([3], 0)
