"""The fast routes of CKA and Procrustes (issue 13) against independent
float64 routes: the register-blocked max_kernel_gram against its
plain-PyTorch twin (spectral_ext.reference) across tile and channel-chunk
boundaries, the RBF Gram kept as one syrk triangle, the blocked HSIC sums,
channel_normalize's sums in the input dtype and the direct orthogonal
Procrustes (seed 004 section 5, appendix D.7)."""
import pytest
import torch

import spectral_ext as se
from spectral_ext import reference
from spectral_ext import similarity as S
from spectral_ext.similarity import _hsic, _layout

F64 = dict(rtol=1e-11, atol=1e-11)


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------- max_kernel_gram

# N around the 64-row tile, C across the channel chunks (32 float32 / 16 float64 channels at S = 1), S = 0, 1, > 1
MAX_SHAPES = [(1, 1, 1, 1), (63, 64, 1, 1), (65, 129, 33, 1), (130, 7, 70, 1), (70, 70, 17, 3), (9, 66, 40, 5),
              (5, 3, 4, 0)]


@pytest.mark.parametrize("N,Np,C,S", MAX_SHAPES)
def test_max_kernel_gram_matches_reference_on_both_paths(N, Np, C, S):
    """Unit-scale inputs take the path without NaN tracking, inputs that
    could overflow (1e153: the sums stay finite; 1e300: the products
    overflow, and inf - inf is NaN) the tracking one; all equal amax of
    the rounded products' sums."""
    X, Y = rand(N, C, S), rand(Np, C, S, seed=1)
    for scale in (1.0, 1e153, 1e300):
        A, B = X * scale, Y * scale
        torch.testing.assert_close(se.max_kernel_gram(A, B) if scale == 1 else
                                   torch.ops.spectral_ext.max_kernel_gram(A, B),
                                   reference.max_kernel_gram(A, B), equal_nan=True, **F64)
        self_gram = torch.ops.spectral_ext.max_kernel_gram(A)
        torch.testing.assert_close(self_gram, reference.max_kernel_gram(A), equal_nan=True, **F64)
        torch.testing.assert_close(self_gram, self_gram.T, rtol=0, atol=0, equal_nan=True)  # mirrored copies
    torch.testing.assert_close(se.max_kernel_gram(X.float(), Y.float()), reference.max_kernel_gram(X, Y).float(),
                               rtol=1e-5, atol=1e-5)


def test_max_kernel_gram_nan_and_infinity_follow_amax():
    """A NaN product anywhere in a row's channels, or inf - inf in a sum over
    positions, gives NaN as amax does; an infinite product is kept."""
    X = rand(70, 40, 2)
    X[3, 35, 0] = float("nan")  # in the second channel chunk
    X[5, 2, 0], X[5, 2, 1] = float("inf"), float("-inf")
    X[7, 1, :] = 0.0
    X[7, 1, 0] = float("inf")
    want = reference.max_kernel_gram(X)
    got = torch.ops.spectral_ext.max_kernel_gram(X)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[3]).all()
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite], want[finite])


def test_max_kernel_gram_opcheck():
    for args in ((rand(65, 33, 1),), (rand(65, 3, 2), rand(10, 3, 2, seed=1)), (rand(20, 3, 1) * 1e300,)):
        torch.library.opcheck(torch.ops.spectral_ext.max_kernel_gram.default, args)


# ---------------------------------------------------------------- RBF as a triangle, the HSIC sums

@pytest.mark.parametrize("n,d", [(5, 3), (64, 10), (131, 40)])
def test_rbf_lower_is_the_kernel_matrix_triangle(n, d):
    R = rand(n, d, 1).relu() + 3.0
    K = S.kernel_matrix(R, "rbf", bandwidth=0.7)
    torch.testing.assert_close(_hsic._rbf_lower(R, 0.7), K.tril(-1), rtol=1e-12, atol=1e-14)
    diag, rows, total = _hsic._gram_terms(_hsic._rbf_lower(R, 0.7), lower=True)
    torch.testing.assert_close(rows, K.sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(diag, K.diagonal(), rtol=0, atol=0)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("kernel", ["rbf", "max", "linear"])
def test_direct_route_matches_hsic_of_explicit_grams(kernel, unbiased):
    """cka on one pair (the direct route: a triangle for RBF, blocked sums)
    against hsic() of the full kernel matrices (U-centred copies)."""
    g = torch.Generator().manual_seed(3)
    for n, d in ((9, 4), (70, 130), (150, 200)):
        X = torch.randn(n, d, dtype=torch.float64, generator=g).relu()
        Y = torch.randn(n, d, dtype=torch.float64, generator=g) + X
        K = S.kernel_matrix(S.as_channels("X", X), kernel)[None]
        L = S.kernel_matrix(S.as_channels("Y", Y), kernel)[None]
        expected = float(S.hsic(K, L, unbiased) / (S.hsic(K, K, unbiased) * S.hsic(L, L, unbiased)).sqrt())
        assert se.cka(X, Y, kernel, unbiased=unbiased) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_blocked_inner_product(n):
    K, L = rand(n, n), rand(n, n, seed=1)
    assert float(_hsic._inners([(K, L)])[0]) == pytest.approx(float((K * L).sum()), rel=1e-12)
    expected = float((K.float().double() * L.float()).sum())
    assert float(_hsic._inners([(K.float(), L.float())])[0]) == pytest.approx(expected, rel=1e-5, abs=1e-3)


def test_median_of_the_lower_triangle_is_that_of_the_upper():
    A = rand(41, 41).abs()
    A = A + A.T
    torch.testing.assert_close(_hsic._median_offdiagonal(A.tril(-1), "x", lower=True), _hsic._median_offdiagonal(A, "x"))


@pytest.mark.parametrize("kernel", ["rbf", "max"])
def test_float32_rbf_and_max_cka_stay_near_float64(kernel):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 128, generator=g).relu() * 3 + 1
    Y = (X @ torch.randn(128, 128, generator=g) / 128 ** 0.5).relu() + torch.randn(600, 128, generator=g)
    assert se.cka(X, Y, kernel) == pytest.approx(se.cka(X.double(), Y.double(), kernel), rel=1e-5)


# ---------------------------------------------------------------- channel_normalize, Procrustes

def test_channel_normalize_keeps_a_constant_channel_exactly_zero_in_float32():
    X = rand(999, 6, 3, dtype=torch.float32) * 3 + 1
    X[:, 2] = 0.1  # a sum of 2,997 copies of 0.1 is not 2,997 x 0.1 in float32
    Xn = S.channel_normalize(X)
    assert torch.equal(Xn[:, 2], torch.zeros_like(Xn[:, 2]))
    torch.testing.assert_close(Xn.double(), S.channel_normalize(X.double()), rtol=0, atol=1e-6)
    norms = Xn.double().square().sum((0, 2))
    torch.testing.assert_close(norms[[0, 1, 3, 4, 5]], torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-5)
    assert torch.equal(S.channel_normalize(torch.zeros(4, 2, 1), centered=False), torch.zeros(4, 2, 1))


@pytest.mark.parametrize("shape", [(50, 7), (20, 3, 4, 4), (30, 8, 1)])
def test_direct_orthogonal_procrustes_matches_the_moments(shape):
    X = rand(*shape)
    Y = X * 0.5 + rand(*shape, seed=1)
    axis = -1 if len(shape) == 3 else None
    moments = S.CrossMoments()
    moments.update(*_layout._pair(X, Y, axis))
    similarity, distance = moments.procrustes("orthogonal", centered=False)
    assert se.procrustes(X, Y, feature_axis=axis) == pytest.approx(similarity, rel=1e-12)
    assert se.procrustes_distance(X, Y, feature_axis=axis) == pytest.approx(distance, rel=1e-10)
    assert se.procrustes(X.float(), Y.float(), feature_axis=axis) == pytest.approx(similarity, rel=1e-5)


def test_direct_orthogonal_procrustes_errors():
    with pytest.raises(ValueError, match="same samples and positions"):
        se.procrustes(rand(10, 3, 2, 2), rand(10, 3, 3, 3))
    with pytest.raises(ValueError, match="undefined"):
        se.procrustes(torch.zeros(10, 3), rand(10, 3))
