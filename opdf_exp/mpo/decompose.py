"""MPO (tensor-train matrix) decomposition and contraction of a single matrix.

Layout. An (I x J) matrix W with I = prod(i_k) rows (PyTorch ``out_features``) and J = prod(j_k) columns is split
into n local tensors T_k of shape (r_{k-1}, i_k, j_k, r_k), r_0 = r_n = 1, such that

    W[(i_1..i_n), (j_1..j_n)] = sum_{a} T_1[1, i_1, j_1, a_1] T_2[a_1, i_2, j_2, a_2] ... T_n[a_{n-1}, i_n, j_n, 1]

(row-major multi-indices). This is exactly tensorly's TT-matrix layout (first half of the tensorized modes are the
rows, cores are (rank, row, col, rank)), so ``tensorly.tt_matrix_to_tensor`` is an independent oracle for us.

What is ours and why (measured numbers in docs/mpo.md):
  * The sequential SVD itself. ``tensorly.decomposition.tensor_train_matrix`` computes the same left-canonical
    TT-SVD but runs a full LAPACK SVD at every site; for the OPDF shapes ([64,1,1,1,48] x [32,1,1,1,24]) that is
    one 2048x1152 SVD plus three 1152x1152 SVDs of matrices that are already ``diag(S) V^T`` -- 5.7 s per
    BERT-base FFN matrix (1 thread), 85 s for a 6-layer student vs 7.7 s here. We skip sites with i_k j_k = 1
    (their core is exactly the identity) and compute each SVD through the eigendecomposition of the smaller Gram
    matrix when that is numerically safe (2x faster than gesdd; reconstruction stays exact because
    W = (W V) V^T for orthogonal V). ``backend="tensorly"`` runs tensorly's routine instead (same result, tested).
  * The symmetric gauge and the sign fixing (tensorly has neither), and bond truncation with an exact
    re-canonicalisation.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Sequence

import torch

from opdf_exp.errors import ConfigError
from opdf_exp.utils.threads import torch_threads

log = logging.getLogger(__name__)

GAUGES = ("symmetric", "left", None)
SVD_METHODS = ("auto", "gram", "gesdd")
# Gram-matrix SVD is used only when the smallest kept singular value is at least this fraction of the largest:
# eigenvalues of W^T W then carry a relative error <= eps * kappa^2 ~ 2e-8, i.e. ~1e-8 on singular values.
_GRAM_MIN_RATIO = 1e-4
# Singular values below this fraction of a bond's largest are clamped before the symmetric gauge divides by them.
_CLAMP = 1e-12
# Adjacent singular values closer than this (relative to the largest) make the gauge ill-defined (a rotation, not
# only a sign, is free); we warn once per decomposition.
_DEGENERATE_GAP = 1e-10
# torch intra-op threads while decomposing on the CPU (None: leave torch's setting). One thread by default: on
# shared cores, MKL's multi-threaded eigh and the OpenMP barriers of every other op degrade 5-30x under
# oversubscription (2-core dev box, load ~3: 36 BERT-base matrices 18.6 s with 2 threads vs 7.6 s with 1; best idle
# moment 3.9 s with 2), whereas an idle second core saves only a few seconds once per run. See docs/mpo.md.
DECOMPOSE_THREADS: int | None = 1


def _decompose_threads(device: torch.device):
    return torch_threads(DECOMPOSE_THREADS if device.type == "cpu" else None)


def _as_factors(factors: Sequence[int], what: str) -> list[int]:
    try:
        out = [int(f) for f in factors]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a list of positive integers, got {factors!r}") from None
    if not out or any(f < 1 for f in out) or any(float(f) != float(g) for f, g in zip(out, factors)):
        raise ConfigError(f"{what} must be a non-empty list of positive integers, got {list(factors)!r}")
    return out


def check_factors(shape: tuple[int, int], row_factors: Sequence[int],
                  col_factors: Sequence[int]) -> tuple[list[int], list[int]]:
    """Validate factor lists for an (I x J) matrix; return them as int lists. Raises ConfigError naming the fix."""
    rows = _as_factors(row_factors, "row factors")
    cols = _as_factors(col_factors, "column factors")
    if len(rows) != len(cols):
        raise ConfigError(f"row factors {rows} and column factors {cols} have different lengths ({len(rows)} vs "
                          f"{len(cols)}); give both dimensions the same number of factors n (pad with 1s)")
    check_product(rows, shape[0], "row factors")
    check_product(cols, shape[1], "column factors")
    return rows, cols


def check_product(factors: Sequence[int], dim: int, what: str = "factors") -> None:
    """Raise a ConfigError naming the fix unless ``factors`` multiply to ``dim`` (one message for every caller)."""
    if math.prod(factors) != dim:
        raise ConfigError(f"{what} {list(factors)} multiply to {math.prod(factors)} but the dimension is {dim}; pass "
                          f"factors whose product is {dim} or set n={len(factors)} to choose them automatically")


def check_gauge(gauge) -> None:
    """Raise a ConfigError unless ``gauge`` is one of :data:`GAUGES`."""
    if gauge not in GAUGES:
        raise ConfigError(f"gauge={gauge!r} is unknown; use 'symmetric' or None (left-canonical)")


def check_max_bond(max_bond) -> int | None:
    """``max_bond`` as an int (None: lossless); a ConfigError for anything but a positive integer."""
    if max_bond is None:
        return None
    if isinstance(max_bond, bool) or int(max_bond) != max_bond or int(max_bond) < 1:
        raise ConfigError(f"max_bond={max_bond!r} must be a positive integer (or null for a lossless MPO)")
    return int(max_bond)


def mpo_ranks(row_factors: Sequence[int], col_factors: Sequence[int], max_bond: int | None = None) -> list[int]:
    """Bond dimensions [r_0, ..., r_n]: r_k = min(prod_{m<=k} i_m j_m, prod_{m>k} i_m j_m), capped by max_bond.

    The uncapped value is the largest rank an exact decomposition can need (the rank of the bond-k unfolding is at
    most the smaller side), so max_bond=None is lossless.
    """
    max_bond = check_max_bond(max_bond)
    dims = [int(i) * int(j) for i, j in zip(row_factors, col_factors)]
    total = math.prod(dims)
    ranks, left = [1], 1
    for d in dims[:-1]:
        left *= d
        r = min(left, total // left)
        ranks.append(r if max_bond is None else min(r, max_bond))
    ranks.append(1)
    return ranks


def mpo_num_params(row_factors: Sequence[int], col_factors: Sequence[int], max_bond: int | None = None) -> int:
    """sum_k r_{k-1} i_k j_k r_k -- the trainable size of one MPO matrix."""
    ranks = mpo_ranks(row_factors, col_factors, max_bond)
    return sum(ranks[k] * int(i) * int(j) * ranks[k + 1] for k, (i, j) in enumerate(zip(row_factors, col_factors)))


# --------------------------------------------------------------------------------------------------- SVD helper
def _svd(m: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD truncated to ``rank``: m ~= U diag(S) Vh with S descending.

    Why the Gram route: eigh of the smaller Gram matrix plus one matmul is 2-3x faster than LAPACK gesdd on CPU for
    the 1024x576 / 2048x1152 reshuffled BERT matrices. U (or Vh) is recovered as m V / S, so U diag(S) Vh = m V V^T
    is exact whenever nothing is truncated. "auto" falls back to gesdd when the kept spectrum spans more than
    1/_GRAM_MIN_RATIO (rank-deficient or ill-conditioned input), where the Gram route would lose accuracy.
    """
    rows, cols = m.shape
    rank = min(rank, rows, cols)
    if method in ("auto", "gram"):
        tall = rows >= cols
        gram = m.mT @ m if tall else m @ m.mT
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
        s = evals.clamp_min(0).sqrt()
        ok = bool(s[0] > 0) and bool(s[-1] >= _GRAM_MIN_RATIO * s[0])
        if ok or method == "gram":
            safe = torch.where(s > 0, s, torch.ones_like(s))
            if tall:
                return (m @ evecs) / safe, s, evecs.mT
            return evecs, s, (evecs.mT @ m) / safe[:, None]
    elif method != "gesdd":
        raise ConfigError(f"svd method {method!r} is unknown; use one of {', '.join(SVD_METHODS)}")
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


# --------------------------------------------------------------------------------------------------- decomposition
def _compute_device(device: torch.device) -> torch.device:
    # float64 is unavailable on some accelerators (MPS); decompose on the CPU there.
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def _left_canonical(w: torch.Tensor, rows: list[int], cols: list[int], ranks: list[int], method: str,
                    skip_trivial: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """Sequential (TT-)SVD. Returns left-orthonormal cores, the singular values at each bond, and whether any bond
    after the first was truncated (then those values are not the final MPO's Schmidt values)."""
    n = len(rows)
    dims = [i * j for i, j in zip(rows, cols)]
    # (i_1..i_n, j_1..j_n) -> (i_1, j_1, ..., i_n, j_n): site k's row and column index become neighbours.
    x = w.reshape(rows + cols).permute([p for k in range(n) for p in (k, n + k)]).reshape(-1)
    cores, spectra, truncated_late = [], [], False
    r_prev = 1
    for k in range(n - 1):
        mat = x.reshape(r_prev * dims[k], -1)
        if skip_trivial and k > 0 and dims[k] == 1 and ranks[k + 1] == r_prev:
            # mat is diag(S) V^T from the previous step: its SVD is I * S * V^T, so the core is the identity.
            core = torch.eye(r_prev, dtype=w.dtype, device=w.device)
            spectra.append(spectra[-1])
        else:
            full = min(mat.shape)
            u, s, vh = _svd(mat, ranks[k + 1], method)
            if k > 0 and ranks[k + 1] < full:
                truncated_late = True
            core = u
            x = s[:, None] * vh
            spectra.append(s)
        r_next = core.shape[1]
        cores.append(core.reshape(r_prev, rows[k], cols[k], r_next))
        r_prev = r_next
    cores.append(x.reshape(r_prev, rows[-1], cols[-1], 1))
    return cores, spectra, truncated_late


def _right_sweep(cores: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Left-canonical cores -> cores 2..n right-orthonormal, with the exact Schmidt values of the MPO at each bond.

    Needed only after truncation at a later bond: then the forward sweep's singular values belong to an
    intermediate approximation, not to the final MPO.
    """
    cores = list(cores)
    spectra: list[torch.Tensor] = [None] * (len(cores) - 1)  # type: ignore[list-item]
    for k in range(len(cores) - 1, 0, -1):
        r0, i, j, r1 = cores[k].shape
        u, s, vh = torch.linalg.svd(cores[k].reshape(r0, i * j * r1), full_matrices=False)
        cores[k] = vh.reshape(-1, i, j, r1)
        spectra[k - 1] = s
        cores[k - 1] = torch.tensordot(cores[k - 1], u * s, dims=([3], [0]))
    return cores, spectra


def _clamped_sqrt(s: torch.Tensor) -> torch.Tensor:
    top = s[0] if s.numel() and s[0] > 0 else torch.ones((), dtype=s.dtype, device=s.device)
    return s.clamp_min(top * _CLAMP).sqrt()


def fix_signs(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Deterministic sign gauge: sweep the bonds left to right; at bond k flip each bond index r so that the
    largest-magnitude entry of T_k[..., r] is positive, compensating in T_{k+1}[r, ...] (W is unchanged).

    Independent SVDs return singular vectors with arbitrary signs; this makes the tensors a function of W alone
    (for a non-degenerate spectrum), so teacher and student decomposed separately are comparable entry by entry.
    For the OPDF shapes ([a,1,..,1,b]) it makes every middle tensor exactly the identity.
    """
    n = len(cores)
    signs: list[torch.Tensor | None] = [None] * (n + 1)  # signs[k]: flips of the bond left of core k
    for k in range(n - 1):
        core = cores[k]
        mat = core.reshape(-1, core.shape[-1])
        pick = mat.abs().argmax(dim=0)  # unaffected by the flips of the bond to the left
        sign = torch.sign(mat.gather(0, pick[None]).squeeze(0))
        if signs[k] is not None:  # the entry as it will be after the left bond's flip
            sign = sign * signs[k][pick // (core.shape[1] * core.shape[2])]
        signs[k + 1] = torch.where(sign == 0, torch.ones_like(sign), sign)
    out = []
    for k, core in enumerate(cores):  # apply both bonds' flips with one multiplication per core
        left = signs[k] if signs[k] is not None else core.new_ones(core.shape[0])
        right = signs[k + 1] if signs[k + 1] is not None else core.new_ones(core.shape[-1])
        out.append(core * (left[:, None, None, None] * right))
    return out


def _warn_degenerate(spectra: list[torch.Tensor]) -> None:
    for k, s in enumerate(spectra):
        if s.numel() < 2 or s[0] <= 0:
            continue
        live = s[s > s[0] * 1e-8]
        if live.numel() >= 2 and bool(((live[:-1] - live[1:]) < _DEGENERATE_GAP * s[0]).any()):
            log.warning("MPO bond %d has (nearly) degenerate singular values: the gauge is then fixed only up to a "
                        "rotation, so tensor-level comparisons with another decomposition are not meaningful there",
                        k + 1)
            return


def _tensorly_left_canonical(w: torch.Tensor, rows: list[int], cols: list[int], ranks: list[int]) -> list[torch.Tensor]:
    """tensorly's TT-SVD (pytorch backend, restored afterwards): left-canonical cores with tensorly's own sign flip.

    Slower than ours (a full SVD at every site); kept as an alternative and as an oracle in tests.
    """
    import tensorly as tl
    from tensorly.decomposition import tensor_train_matrix

    with tl.backend_context("pytorch", local_threadsafe=True):
        return [c for c in tensor_train_matrix(w.reshape(rows + cols), rank=list(ranks))]


def mpo_decompose(weight: torch.Tensor, row_factors: Sequence[int], col_factors: Sequence[int],
                  max_bond: int | None = None, gauge: str | None = "symmetric", *, fix_sign: bool = True,
                  svd: str = "auto", backend: str = "torch", skip_trivial: bool = True) -> list[torch.Tensor]:
    """Split an (out x in) matrix into n local tensors (r_{k-1}, i_k, j_k, r_k); rows factor ``out_features``.

    Computed in float64 (on the weight's device when it supports float64) and cast back to the weight's dtype.

    gauge:
      "symmetric" (default; the paper's "normalization"): at every bond k the contraction of T_1..T_k equals
          U_k sqrt(S_k) and that of T_{k+1}..T_n equals sqrt(S_k) V_k^T, where U_k S_k V_k^T is the SVD of W
          unfolded at bond k. Unique up to signs, which ``fix_sign`` then fixes.
      "left" or None: plain left-canonical sequential SVD (T_1..T_{n-1} orthonormal, T_n = S V^T).
    max_bond: cap on every bond dimension (None: lossless).
    svd: "auto" | "gram" | "gesdd" (see :func:`_svd`). backend: "torch" (ours) | "tensorly".
    skip_trivial: use the exact identity core for sites with i_k j_k = 1 instead of an SVD (the fast path for
      OPDF's [a,1,...,1,b] shapes; False runs the general path, used by tests to check both agree).
    """
    if weight.dim() != 2:
        raise ConfigError(f"mpo_decompose needs a 2-D matrix, got shape {tuple(weight.shape)}")
    rows, cols = check_factors(tuple(weight.shape), row_factors, col_factors)
    check_gauge(gauge)
    if backend not in ("torch", "tensorly"):
        raise ConfigError(f"backend={backend!r} is unknown; use 'torch' or 'tensorly'")
    ranks = mpo_ranks(rows, cols, max_bond)
    out_dtype, out_device = weight.dtype, weight.device
    device = _compute_device(out_device)
    with torch.no_grad(), _decompose_threads(device):
        w = weight.detach().to(device=device, dtype=torch.float64)
        if len(rows) == 1:
            return [weight.detach().clone().reshape(1, rows[0], cols[0], 1)]
        if backend == "tensorly":
            # tensorly returns no singular values; the right sweep recovers the exact ones for the gauge.
            cores, spectra, recanon = _tensorly_left_canonical(w, rows, cols, ranks), [], True
            if gauge == "symmetric":
                cores, spectra = _right_sweep(cores)
        else:
            cores, spectra, recanon = _left_canonical(w, rows, cols, ranks, svd, skip_trivial)
            if gauge == "symmetric" and recanon:
                cores, spectra = _right_sweep(cores)
        if gauge == "symmetric":
            _warn_degenerate(spectra)
            c = [_clamped_sqrt(s) for s in spectra]
            n = len(cores)
            if recanon:  # cores 2..n right-orthonormal, T_1 carries U S: move sqrt(S) to the left of every bond
                out = [cores[0] / c[0]]
                out += [c[k - 1][:, None, None, None] * cores[k] / c[k] for k in range(1, n - 1)]
                out.append(c[-1][:, None, None, None] * cores[-1])
            else:  # left-canonical: move sqrt(S) to the right of every bond
                out = [cores[0] * c[0]]
                # (T * c_k) / c_{k-1}: an identity core with c_k = c_{k-1} stays exactly the identity
                out += [(cores[k] * c[k]) / c[k - 1][:, None, None, None] for k in range(1, n - 1)]
                out.append(cores[-1] / c[-1][:, None, None, None])
            cores = out
        if fix_sign:
            cores = fix_signs(cores)
        return [core.to(device=out_device, dtype=out_dtype).contiguous() for core in cores]


# --------------------------------------------------------------------------------------------------- contraction
@lru_cache(maxsize=256)
def contraction_plan(ranks: tuple[int, ...], dims: tuple[int, ...]) -> tuple:
    """Cheapest order to contract a chain of cores (matrix-chain dynamic programme), as a nested tuple tree.

    Merging segment [a..m] with [m+1..b] is one matmul of (r_a * P_am) x r_{m+1} by r_{m+1} x (P_mb * r_{b+1}),
    costing r_a P_am r_{m+1} P_mb r_{b+1} multiply-adds (P = product of the segments' i_k j_k). For OPDF's
    [a,1,1,1,b] shapes the plan multiplies the r x r middle chain into the small end first, so rebuilding W costs
    ~(n-3) r^3 + I J r instead of (n-2) I_1 J_1 r^2 + I J r when contracting left to right.
    """
    n = len(dims)
    phys = [[1] * n for _ in range(n)]
    for a in range(n):
        p = 1
        for b in range(a, n):
            p *= dims[b]
            phys[a][b] = p
    cost = [[0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for length in range(2, n + 1):
        for a in range(n - length + 1):
            b = a + length - 1
            best, arg = None, a
            for m in range(a, b):
                c = cost[a][m] + cost[m + 1][b] + ranks[a] * phys[a][m] * ranks[m + 1] * phys[m + 1][b] * ranks[b + 1]
                if best is None or c < best:
                    best, arg = c, m
            cost[a][b], split[a][b] = best, arg

    def tree(a: int, b: int):
        if a == b:
            return a
        m = split[a][b]
        return (tree(a, m), tree(m + 1, b))

    return tree(0, n - 1)


def _run_plan(node, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract the cores of a plan subtree into a (r_left, P, r_right) tensor with one matmul per merge."""
    if isinstance(node, int):
        c = cores[node]
        return c.reshape(c.shape[0], -1, c.shape[-1])
    left, right = _run_plan(node[0], cores), _run_plan(node[1], cores)
    rl, p1, rm = left.shape
    _, p2, rr = right.shape
    return (left.reshape(rl * p1, rm) @ right.reshape(rm, p2 * rr)).reshape(rl, p1 * p2, rr)


def mpo_contract(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild the (prod i_k) x (prod j_k) matrix from local tensors (r_{k-1}, i_k, j_k, r_k). Differentiable."""
    tensors = list(tensors)
    if not tensors or any(t.dim() != 4 for t in tensors):
        raise ConfigError("mpo_contract needs a non-empty list of 4-D tensors (r_{k-1}, i_k, j_k, r_k)")
    ranks = [t.shape[0] for t in tensors] + [tensors[-1].shape[-1]]
    if ranks[0] != 1 or ranks[-1] != 1 or any(t.shape[-1] != u.shape[0] for t, u in zip(tensors, tensors[1:])):
        raise ConfigError(f"MPO tensors do not chain: shapes {[tuple(t.shape) for t in tensors]}; each tensor's last "
                          f"dimension must equal the next one's first, and the ends must be 1")
    rows = [t.shape[1] for t in tensors]
    cols = [t.shape[2] for t in tensors]
    plan = contraction_plan(tuple(ranks), tuple(i * j for i, j in zip(rows, cols)))
    return contract_with_plan(plan, tensors, rows, cols)


def contract_with_plan(plan, tensors: Sequence[torch.Tensor], row_factors: Sequence[int],
                       col_factors: Sequence[int]) -> torch.Tensor:
    """The (prod i_k) x (prod j_k) matrix of already-validated tensors, contracted in the order of ``plan``.

    Shared by :func:`mpo_contract` and the MPO layers (which compute their plan once). Plain autograd does the
    backward: each merge's two gradient matmuls cost what its forward matmul costs, so the forward's cheapest order is
    also the cheapest order for forward + backward (a hand-written backward with the same plan was measured and gave
    nothing, see docs/mpo.md).
    """
    n = len(tensors)
    full = _run_plan(plan, tensors)  # (1, i_1 j_1 i_2 j_2 ... i_n j_n, 1)
    if n == 1:
        return full.reshape(row_factors[0], col_factors[0])
    full = full.reshape([d for k in range(n) for d in (row_factors[k], col_factors[k])])
    perm = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))  # (i_1, j_1, ..., i_n, j_n) -> (i_1..i_n, j_1..j_n)
    return full.permute(perm).reshape(math.prod(row_factors), math.prod(col_factors))
