"""linear_sum_assignment against scipy.optimize.linear_sum_assignment: the same
optimal cost on random, weight-matching-like, rectangular and tied problems, the
same indices where the optimum is unique, +inf (forbidden) entries and infeasible
problems as scipy treats them, and the bad-input errors."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import spectral_ext as se
from spectral_ext import reference


def total(cost, rows, cols):
    return float(np.asarray(cost)[np.asarray(rows), np.asarray(cols)].sum())


def weight_matching_cost(B, n, d, noise, seed):
    """-A B^T with B a noisy row permutation of A, as in weight matching."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(B)])
    Bm = torch.gather(A, 1, perm[:, :, None].expand(-1, -1, d)) + noise * torch.randn(B, n, d, generator=g,
                                                                                       dtype=torch.float64)
    return -(A @ Bm.transpose(1, 2)), perm


@pytest.mark.parametrize("n,m", [(1, 1), (1, 7), (7, 1), (5, 5), (30, 30), (17, 40), (40, 17), (64, 65), (129, 129)])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_scipy_on_random_costs(n, m, maximize):
    g = torch.Generator().manual_seed(n * 1000 + m)
    cost = torch.randn(4, n, m, generator=g, dtype=torch.float64)
    rows, cols = se.linear_sum_assignment(cost, maximize=maximize)
    assert rows.shape == cols.shape == (4, min(n, m)) and rows.dtype == torch.int64
    for b in range(4):
        want = scipy_lsa(cost[b].numpy(), maximize=maximize)
        # Random real costs have one optimum: the very same indices.
        np.testing.assert_array_equal(rows[b].numpy(), want[0])
        np.testing.assert_array_equal(cols[b].numpy(), want[1])
        # A valid assignment: distinct rows and columns.
        assert len(set(cols[b].tolist())) == min(n, m) == len(set(rows[b].tolist()))


def test_weight_matching_recovers_the_permutation_and_scipy():
    cost, perm = weight_matching_cost(6, 150, 32, 0.1, seed=3)
    rows, cols = se.linear_sum_assignment(cost)
    inverse = torch.argsort(perm, dim=1)  # B[perm[k]] ~ A[k], so A row i matches B row inverse[i]
    torch.testing.assert_close(cols, inverse, rtol=0, atol=0)
    for b in range(6):
        want = scipy_lsa(cost[b].numpy())
        np.testing.assert_array_equal(cols[b].numpy(), want[1])


@pytest.mark.parametrize("n,m", [(6, 6), (12, 12), (5, 9), (9, 5), (40, 40)])
def test_ties_give_scipys_optimal_cost(n, m):
    # Small integer costs: many optimal assignments; the total must be scipy's (and the
    # indices too: python_tests/test_compat_scipy.py).
    rng = np.random.default_rng(n + m)
    cost = rng.integers(0, 3, size=(8, n, m)).astype(np.float64)
    for maximize in (False, True):
        rows, cols = se.linear_sum_assignment(torch.from_numpy(cost), maximize=maximize)
        for b in range(8):
            want = scipy_lsa(cost[b], maximize=maximize)
            assert total(cost[b], rows[b], cols[b]) == total(cost[b], *want)
            assert len(set(cols[b].tolist())) == min(n, m) == len(set(rows[b].tolist()))
            assert rows[b].tolist() == sorted(rows[b].tolist())


def test_constant_cost_and_float32():
    rows, cols = se.linear_sum_assignment(torch.ones(5, 5))
    assert sorted(cols.tolist()) == list(range(5))
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(3, 20, 25, generator=g)
    rows, cols = se.linear_sum_assignment(cost)
    for b in range(3):
        want = scipy_lsa(cost[b].double().numpy())
        np.testing.assert_array_equal(cols[b].numpy(), want[1])


def test_one_problem_is_scipys_pair_and_numpy_in_numpy_out():
    cost = np.random.default_rng(0).standard_normal((6, 4))
    rows, cols = se.linear_sum_assignment(cost)
    assert isinstance(rows, np.ndarray) and rows.shape == (4,)
    want = scipy_lsa(cost)
    np.testing.assert_array_equal(rows, want[0])
    np.testing.assert_array_equal(cols, want[1])
    t_rows, t_cols = se.linear_sum_assignment(torch.from_numpy(cost))
    assert isinstance(t_rows, torch.Tensor) and t_rows.tolist() == want[0].tolist()


def test_native_equals_reference_backend_and_leaves_input_alone():
    cost, _ = weight_matching_cost(3, 40, 8, 1.0, seed=5)
    before = cost.clone()
    native = se.linear_sum_assignment(cost, maximize=True)
    with se.use_backend("reference"):
        ref = se.linear_sum_assignment(cost, maximize=True)
    torch.testing.assert_close(native, ref, rtol=0, atol=0)
    torch.testing.assert_close(ref, reference.linear_sum_assignment(cost, True), rtol=0, atol=0)
    assert torch.equal(cost, before)
    forbidden = inf_costs(3, 30, 30, 0.5, seed=6)
    before = forbidden.clone()
    native = se.linear_sum_assignment(forbidden)
    with se.use_backend("reference"):
        ref = se.linear_sum_assignment(forbidden)
    torch.testing.assert_close(native, ref, rtol=0, atol=0)
    assert torch.equal(forbidden, before)


def test_empty_problems():
    rows, cols = se.linear_sum_assignment(torch.zeros(2, 0, 5))
    assert rows.shape == cols.shape == (2, 0)
    rows, cols = se.linear_sum_assignment(torch.zeros(0, 3, 3))
    assert rows.shape == (0, 3)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"cost matrix contains invalid numeric entries \(NaN or -inf\)"):
        se.linear_sum_assignment(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="contains invalid numeric entries"):
        se.linear_sum_assignment(torch.tensor([[1.0, -float("inf")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"NaN or \+inf, with maximize=True"):
        se.linear_sum_assignment(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), maximize=True)
    with pytest.raises(ValueError, match="cost must have shape"):
        se.linear_sum_assignment(torch.zeros(3))
    with pytest.raises(TypeError, match="cost must be float32 or float64"):
        se.linear_sum_assignment(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="Cannot cast array data from dtype\\('complex128'\\)"):
        se.linear_sum_assignment(np.eye(2, dtype=complex))
    with pytest.raises(TypeError, match="maximize must be a bool"):
        se.linear_sum_assignment(torch.zeros(3, 3), maximize="yes")
    # The operator itself checks every problem of the batch, not only the first.
    batch = torch.zeros(3, 4, 4, dtype=torch.float64)
    batch[2, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="invalid numeric entries"):
        torch.ops.spectral_ext.linear_sum_assignment(batch, False)


def inf_costs(B, n, m, fraction, seed):
    """Random costs with a fraction of +inf (forbidden) entries and a finite diagonal,
    so every problem stays feasible."""
    g = torch.Generator().manual_seed(seed)
    cost = torch.randn(B, n, m, generator=g, dtype=torch.float64)
    cost[torch.rand(B, n, m, generator=g) < fraction] = float("inf")
    k = min(n, m)
    cost[:, torch.arange(k), torch.arange(k)] = torch.randn(B, k, generator=g, dtype=torch.float64)
    return cost


@pytest.mark.parametrize("n,m", [(2, 2), (8, 8), (60, 60), (12, 30), (30, 12)])
@pytest.mark.parametrize("maximize", [False, True])
def test_inf_entries_are_forbidden_pairs_as_in_scipy(n, m, maximize):
    cost = inf_costs(4, n, m, 0.4, seed=n * 100 + m)
    if maximize:
        cost = -cost  # -inf is the forbidden pair when maximising
    rows, cols = se.linear_sum_assignment(cost, maximize=maximize)
    for b in range(4):
        want = scipy_lsa(cost[b].numpy(), maximize=maximize)
        np.testing.assert_array_equal(rows[b].numpy(), want[0])
        np.testing.assert_array_equal(cols[b].numpy(), want[1])
        assert np.isfinite(total(cost[b], rows[b], cols[b]))


def test_infeasible_problems_raise_like_scipy():
    inf = float("inf")
    for cost in ([[inf, inf], [1.0, 2.0]], [[1.0, inf, inf], [2.0, inf, inf]], [[inf], [inf], [inf]]):
        cost = torch.tensor(cost, dtype=torch.float64)
        with pytest.raises(ValueError, match="cost matrix is infeasible"):
            scipy_lsa(cost.numpy())
        with pytest.raises(ValueError, match="cost matrix is infeasible"):
            se.linear_sum_assignment(cost)
    batch = inf_costs(3, 5, 5, 0.0, seed=1)
    batch[1, :, 2] = inf  # column 2 of problem 1 cannot be assigned
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        se.linear_sum_assignment(batch)


@pytest.mark.parametrize("kind", ["random", "weight_matching"])
def test_large_square_problems_match_scipys_indices(kind):
    # 300 x 300 (the benchmark's size): JV's augmenting row reduction runs out of its
    # budget on random costs and does all the work on noisy weight matching.
    if kind == "random":
        cost = torch.rand(3, 300, 300, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    else:
        cost, _ = weight_matching_cost(3, 300, 64, 1.0, seed=7)
    rows, cols = se.linear_sum_assignment(cost)
    for b in range(3):
        want = scipy_lsa(cost[b].numpy())
        np.testing.assert_array_equal(cols[b].numpy(), want[1])


def test_strided_float32_and_maximize_inputs_are_read_as_given():
    # Not contiguous, float32, maximize, transposed: each is copied per problem in the kernel.
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(5, 24, 40, generator=g, dtype=torch.float64)
    for cost in (wide[:, :, ::2], wide.transpose(1, 2)[:, ::2], wide.float(), wide[:, :20].transpose(1, 2)):
        for maximize in (False, True):
            rows, cols = se.linear_sum_assignment(cost, maximize=maximize)
            for b in range(5):
                want = scipy_lsa(cost[b].double().numpy(), maximize=maximize)
                np.testing.assert_array_equal(rows[b].numpy(), want[0])
                np.testing.assert_array_equal(cols[b].numpy(), want[1])


def test_meta_tensors_and_opcheck():
    rows, cols = se.linear_sum_assignment(torch.empty(4, 7, 5, device="meta"))
    assert rows.shape == (4, 5) and rows.device.type == "meta" and rows.dtype == torch.int64
    for cost in (torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(2, 9, 9), inf_costs(2, 7, 7, 0.3, seed=2)):
        torch.library.opcheck(torch.ops.spectral_ext.linear_sum_assignment.default, (cost, False))
        torch.library.opcheck(torch.ops.spectral_ext.linear_sum_assignment.default, (-cost, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_input_gives_indices_on_cuda():
    cost = torch.randn(2, 9, 9, device="cuda")
    rows, cols = se.linear_sum_assignment(cost)
    assert cols.device.type == "cuda"
    assert cols.cpu().tolist() == se.linear_sum_assignment(cost.cpu())[1].tolist()


def test_ctrl_c_stops_a_long_batch():
    from conftest import interrupted

    import time

    line, returncode, waited = interrupted(
        "torch.set_num_threads(1)\ncost = torch.randn(12, 3000, 3000, dtype=torch.float64)  # seconds per problem",
        "se.linear_sum_assignment(cost)")
    assert returncode == 0 and line == "interrupted"
    # One problem's solve time on this machine now (it is several times longer when the cores are shared):
    # the batch must stop within about one problem, not run its twelve.
    torch.set_num_threads(1)
    start = time.perf_counter()
    se.linear_sum_assignment(torch.randn(3000, 3000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    one = time.perf_counter() - start
    assert waited < max(2.0, 2 * one), f"took {waited:.1f} s to stop; one problem takes {one:.1f} s"
