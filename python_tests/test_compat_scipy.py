"""spectral_ext.linear_sum_assignment as a drop-in for scipy.optimize.linear_sum_assignment
(scipy 1.17): the inputs scipy accepts (any array-like), its exceptions and messages,
and its very indices where several assignments are optimal (scipy's tie-breaking),
checked against the installed scipy on cases of our own."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from spectral_ext import linear_sum_assignment as lsa


def assert_same_answer(cost, maximize=False):
    got, want = lsa(cost, maximize=maximize), scipy_lsa(cost, maximize=maximize)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.int64 for x in got)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


class ArrayLike:
    """An object scipy reads through __array__ (as pandas or xarray objects)."""

    def __init__(self, values):
        self.values = np.asarray(values)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


@pytest.mark.parametrize("cost", [
    [[4.0, 1.5, 3.0], [2.0, 0.5, 5.0]],            # nested lists of floats
    [[7, 2], [1, 9], [3, 3]],                       # of ints, tall
    [["1.5", "2"], ["0.25", "4"]],                  # of number strings: scipy parses them
    np.matrix([[3, 1, 2], [2, 3, 1]]),
    np.array([[True, False], [False, True]]),
    np.array([[5, 1], [2, 8]], dtype=np.uint8),
    np.array([[0.5, 1.5], [1.25, 0.75]], dtype=np.float16),
    np.array([[0.5, 1.5], [1.25, 0.75]], dtype=np.float32),
    ArrayLike([[2, 1, 0], [0, 1, 2], [1, 0, 2]]),
    [[2 ** 70, 1.0], [1.0, 2.0]],                   # a Python int beyond int64
])
@pytest.mark.parametrize("maximize", [False, True])
def test_array_likes_are_read_as_scipy_reads_them(cost, maximize):
    assert_same_answer(cost, maximize)


@pytest.mark.parametrize("cost", [
    np.array([["1", "0"], ["0", "1"]]),
    np.array([[1, 0], [0, 1]], dtype=object),
    np.array([[1, 0], [0, 1]], dtype=np.complex64),
    np.array([[1, 0], [0, 1]], dtype=np.longdouble),
])
def test_uncastable_arrays_raise_scipys_type_error(cost):
    with pytest.raises(TypeError) as want:
        scipy_lsa(cost)
    with pytest.raises(TypeError) as got:
        lsa(cost)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("cost", [[4.0, 2.0], 3.0, None, np.zeros((2, 2, 2, 2))])
def test_wrong_dimensions_raise_scipys_value_error(cost):
    with pytest.raises(ValueError, match=r"expected a matrix \(2-D array\)"):
        scipy_lsa(cost)
    with pytest.raises(ValueError, match=r"expected a matrix \(2-D array\), got a \d array"):
        lsa(cost)


@pytest.mark.parametrize("cost,maximize", [
    (np.array([[0.0, np.nan], [1.0, 2.0]]), False),
    ([[3.0, 1.0], [-np.inf, 2.0]], False),
    ([[None, 1.0], [1.0, 2.0]], False),                         # None is read as NaN
    (np.array([[np.inf, 1.0], [1.0, 2.0]]), True),              # +inf is -inf once negated
    (torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 1.0]]), False),
])
def test_invalid_entries_raise_with_scipys_words(cost, maximize):
    plain = cost.numpy() if isinstance(cost, torch.Tensor) else cost
    with pytest.raises(ValueError) as want:
        scipy_lsa(plain, maximize=maximize)
    with pytest.raises(ValueError, match=str(want.value)):  # "matrix contains invalid numeric entries"
        lsa(cost, maximize=maximize)


@pytest.mark.parametrize("cost", [
    [[np.inf, np.inf, 1.0], [np.inf, np.inf, 2.0], [1.0, 2.0, 3.0]],
    [[np.inf], [np.inf]],
    [[5.0, np.inf, np.inf, np.inf], [6.0, np.inf, np.inf, np.inf]],
])
def test_infeasible_costs_raise_with_scipys_words(cost):
    with pytest.raises(ValueError) as want:
        scipy_lsa(cost)
    with pytest.raises(ValueError, match=str(want.value)):  # "cost matrix is infeasible"
        lsa(cost)
    with pytest.raises(ValueError, match=str(want.value)):
        lsa(torch.tensor(cost).expand(3, -1, -1))


@pytest.mark.parametrize("shape", [(0, 0), (4, 0), (0, 6)])
def test_empty_costs_give_empty_answers(shape):
    rows, cols = lsa(np.zeros(shape))
    assert rows.shape == cols.shape == (0,) and rows.dtype == np.int64


@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (11, 11), (4, 9), (9, 4), (30, 30)])
@pytest.mark.parametrize("value", [0.0, 2.5, -1.0])
def test_constant_costs_give_scipys_assignment(shape, value):
    # Every assignment is optimal: scipy's list of unscanned columns decides (the identity
    # when square); the wide and tall ones pin the scan order and the transposition.
    for maximize in (False, True):
        assert_same_answer(np.full(shape, value), maximize)


def tied_costs(kind, B, n, m, seed):
    rng = np.random.default_rng(seed)
    if kind == "small integers":
        return rng.integers(0, 4, (B, n, m)).astype(np.float64)
    if kind == "tenths":  # not integers: the fast route runs, and the duals certify the ties
        return rng.integers(0, 12, (B, n, m)) * 0.1
    if kind == "two values":
        return np.where(rng.random((B, n, m)) < 0.5, 1.0, 2.0)
    if kind == "forbidden pairs":
        cost = rng.integers(0, 3, (B, n, m)).astype(np.float64)
        cost[rng.random((B, n, m)) < 0.25] = np.inf
        k = min(n, m)
        cost[:, np.arange(k), np.arange(k)] = 1.0
        return cost
    if kind == "rank one":  # every assignment costs the same (outer sum)
        return rng.random((B, n, 1)) + rng.random((B, 1, m))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["small integers", "tenths", "two values", "forbidden pairs", "rank one"])
@pytest.mark.parametrize("n,m", [(7, 7), (25, 25), (60, 60), (8, 19), (19, 8)])
def test_ties_break_as_scipy_breaks_them(kind, n, m):
    cost = tied_costs(kind, 6, n, m, seed=n * 31 + m)
    for maximize in (False, True):
        signed = -cost if (maximize and kind == "forbidden pairs") else cost
        rows, cols = lsa(torch.from_numpy(signed), maximize=maximize)  # the batched tensor route
        for b in range(len(cost)):
            want = scipy_lsa(signed[b], maximize=maximize)
            np.testing.assert_array_equal(rows[b].numpy(), want[0])
            np.testing.assert_array_equal(cols[b].numpy(), want[1])
        assert_same_answer(signed[0], maximize)  # and the numpy route


def test_near_ties_and_large_offsets_break_as_scipy_does():
    # Costs whose optimum is unique only by rounding, or whose differences sit on a large
    # offset: the fast route's certificate must hand them to scipy's route.
    rng = np.random.default_rng(5)
    near = np.round(rng.random((4, 80, 80)), 2) + 1e-15 * rng.random((4, 80, 80))
    offset = 1e7 + rng.integers(0, 5, (4, 80, 80)) * 0.37
    for cost in (near, offset):
        rows, cols = lsa(torch.from_numpy(cost))
        for b in range(4):
            np.testing.assert_array_equal(cols[b].numpy(), scipy_lsa(cost[b])[1])


def test_float32_tensor_ties_are_scipys_on_the_float64_values():
    cost = torch.from_numpy(tied_costs("tenths", 4, 30, 30, seed=9)).float()
    rows, cols = lsa(cost)
    for b in range(4):
        np.testing.assert_array_equal(cols[b].numpy(), scipy_lsa(cost[b].double().numpy())[1])
