import pytest
import torch

from pkdpipe.errors import ConfigError
from pkdpipe.strategies import layer_map, names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("strategy", "n", "k", "expected"),
    [
        ("skip", 12, 6, [2, 4, 6, 8, 10]),
        ("last", 12, 6, [7, 8, 9, 10, 11]),
        ("skip", 12, 3, [4, 8]),
        ("last", 12, 3, [10, 11]),
        ("skip", 6, 3, [2, 4]),
        ("last", 6, 3, [4, 5]),
        ("skip", 6, 2, [3]),
        ("last", 6, 2, [5]),
        ("skip", 24, 6, [4, 8, 12, 16, 20]),  # the authors' 24-layer teacher
        ("skip", 12, 1, []),
        ("last", 12, 1, []),
    ],
)
def test_paper_maps(strategy, n, k, expected):
    assert layer_map(strategy, n, k) == expected


@pytest.mark.parametrize("strategy", ["kd", "ft"])
def test_no_patient_loss_strategies_map_nothing(strategy):
    assert layer_map(strategy, 12, 6) == []


def test_skip_spreads_evenly_when_k_does_not_divide_n():
    # round(j * 12 / 5) for j = 1..4 is 2.4, 4.8, 7.2, 9.6 -> 2, 5, 7, 10
    assert layer_map("skip", 12, 5) == [2, 5, 7, 10]
    # halves round up: 3 * 1 / 2 = 1.5 -> 2
    assert layer_map("skip", 3, 2) == [2]


def test_skip_always_valid():
    for n in range(2, 30):
        for k in range(1, n):
            layers = layer_map("skip", n, k)
            assert len(layers) == k - 1
            assert all(1 <= layer <= n - 1 for layer in layers)
            assert layers == sorted(set(layers))
            if n % k == 0:
                assert layers == list(range(n // k, n, n // k))


def test_explicit_overrides_strategy():
    assert layer_map("skip", 12, 6, explicit=[1, 3, 5, 7, 9]) == [1, 3, 5, 7, 9]
    assert layer_map("last", 12, 3, explicit=(2, 11)) == [2, 11]


def test_unknown_strategy():
    with pytest.raises(ConfigError, match="unknown strategy 'pkd': choose one of last, skip, kd, ft"):
        layer_map("pkd", 12, 6)
    assert names() == ("last", "skip", "kd", "ft")


def test_student_needs_a_layer():
    with pytest.raises(ConfigError, match="a student needs at least 1 layer, got K=0"):
        layer_map("skip", 12, 0)


@pytest.mark.parametrize("k", [6, 7])
def test_student_must_be_shallower(k):
    msg = f"a student must be shallower than its teacher: K={k} is not below the teacher's 6 layers"
    with pytest.raises(ConfigError, match=msg):
        layer_map("last", 6, k)


def test_explicit_wrong_length():
    with pytest.raises(ConfigError, match="--teacher-layers needs K-1 = 5 layers, got 3"):
        layer_map("skip", 12, 6, explicit=[2, 4, 6])


def test_explicit_top_layer_refused():
    with pytest.raises(ConfigError, match="layer 12 is the teacher's top layer.*pick layers in 1..11"):
        layer_map("skip", 12, 6, explicit=[2, 4, 6, 8, 12])


@pytest.mark.parametrize("bad", [0, 13])
def test_explicit_out_of_range(bad):
    layers = [bad, 4, 6, 8, 10] if bad == 0 else [2, 4, 6, 8, bad]
    with pytest.raises(ConfigError, match=f"--teacher-layers: layer {bad} is out of range 1..11"):
        layer_map("skip", 12, 6, explicit=layers)


@pytest.mark.parametrize("layers", [[2, 4, 4, 8, 10], [2, 6, 4, 8, 10]])
def test_explicit_not_increasing(layers):
    shown = ",".join(map(str, layers))
    with pytest.raises(ConfigError, match=f"strictly increasing with no repeats, got {shown}"):
        layer_map("skip", 12, 6, explicit=layers)


def test_explicit_not_ints():
    with pytest.raises(ConfigError, match="whole layer numbers, got 2.0"):
        layer_map("skip", 12, 3, explicit=[2.0, 4])


@pytest.mark.parametrize("strategy", ["kd", "ft"])
def test_explicit_with_kd_or_ft(strategy):
    msg = f"--teacher-layers only applies to the last and skip strategies; '{strategy}' has no patient loss"
    with pytest.raises(ConfigError, match=msg):
        layer_map(strategy, 12, 6, explicit=[2, 4, 6, 8, 10])
