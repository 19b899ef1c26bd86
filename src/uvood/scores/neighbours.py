"""The k-th largest similarity of each query to a bank of unit vectors, for KNN (Sun et al., ICML 2022):
exact in float64, searched in float32.

What is exact: for float64 queries q_i and bank rows b_j, all of unit norm, :func:`kth_similarity`
returns t_i = the k-th largest of the float64 dot products q_i^T b_j, the value of the float64 brute
force ``torch.topk(q @ bank.T, k).values[:, -1]`` up to the rounding of one float64 dot product (its
summation order, |error| <= D 2^-53). Which neighbour is the k-th is certified, never guessed:

1. Candidates: the m = min(n, 2k + 8) largest float32 similarities s_1 >= ... >= s_m per query and
   their bank rows. A float32 similarity of unit vectors (inputs rounded to float32, D products summed
   in any order) is within err = (D + 4) 2^-24 of the exact one (Higham, "Accuracy and Stability of
   Numerical Algorithms", Eq. 3.5: |fl(x^T y) - x^T y| <= gamma_D sum_i |x_i y_i|).
2. Certificate: with s_k the float32 k-th value, the exact k-th value t lies in [s_k - err, s_k + err].
   Candidates with s_j > s_k + 2 err are above t, those with s_j < s_k - 2 err below it; t is the
   (k - A)-th largest float64 value of the candidates in the band |s_j - s_k| <= 2 err (A = how many
   lie above the band). This holds when the band ends before s_m (or m = n), since every row outside
   the candidates has a float32 similarity <= s_m; the other queries (near-ties over 2k neighbours)
   are recomputed against the whole bank in float64.

Two candidate searches give the same certified values (both compute float32 dot products with the
bound of step 1; tests check they agree with the float64 brute force and with each other):

* ``"torch"`` (always available): float32 matmul in blocks of ``KNN_BLOCK`` entries, then ``torch.topk``;
* ``"faiss"`` (optional: ``pip install uvood[faiss]``, faiss-cpu): ``faiss.IndexFlatIP``, faiss's exact
  (brute-force) inner-product search, BLAS sgemm fused with a heap selection, run with
  ``torch.get_num_threads()`` threads. Never an approximate index.

``"auto"`` (the default) takes faiss when it is installed, torch otherwise.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from ..errors import UvoodError

#: entries per block of the float32 similarity matrix, queries x references (memory bound; no effect on values)
KNN_BLOCK = 2**25

#: queries per block of the float64 certificate (memory bound; no effect on values)
CERTIFY_ROWS = 1024

BACKENDS = ("auto", "torch", "faiss")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"faiss"`` when importable, else ``"torch"``; an unknown or missing backend is an error."""
    if backend not in BACKENDS:
        raise UvoodError(f"KNN search backend {backend!r} is unknown; use one of {list(BACKENDS)}.")
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise UvoodError("KNN search backend 'faiss' needs faiss-cpu: pip install 'uvood[faiss]', "
                         "or use backend='torch' (same values).")
    return backend


def float32_error(d: int) -> float:
    """err = (D + 4) 2^-24 (with 1% margin): the bound on |float32 similarity - exact| of unit vectors."""
    return (d + 4) * 2.0**-24 * 1.01


class Float32Search:
    """The m largest float32 similarities of unit queries to a fixed bank of unit rows (step 1 of the
    module docstring), with the bank's float32 copy (and faiss index) built once and reused."""

    def __init__(self, bank: torch.Tensor, backend: str = "auto"):
        self.bank, self.requested = bank, backend
        self.backend = resolve_backend(backend)
        self.bank32 = bank.float().contiguous()
        self._index = None

    def top(self, q32: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, rows), both N x m, values float32 sorted in decreasing order."""
        if self.backend == "faiss":
            return self._top_faiss(q32, m)
        n = self.bank32.shape[0]
        rows = max(1, KNN_BLOCK // n)
        vals = torch.empty(q32.shape[0], m, dtype=torch.float32)
        idx = torch.empty(q32.shape[0], m, dtype=torch.int64)
        for lo in range(0, q32.shape[0], rows):
            torch.topk(q32[lo:lo + rows] @ self.bank32.T, m, dim=1, out=(vals[lo:lo + rows], idx[lo:lo + rows]))
        return vals, idx

    def _top_faiss(self, q32, m):
        import faiss

        if self._index is None:
            self._index = faiss.IndexFlatIP(self.bank32.shape[1])
            self._index.add(self.bank32.numpy())
        faiss.omp_set_num_threads(torch.get_num_threads())
        vals, idx = self._index.search(q32.contiguous().numpy(), m)
        idx = torch.from_numpy(idx).long()
        if bool((idx < 0).any()):
            raise UvoodError("KNN: faiss found fewer neighbours than asked for some queries; the features hold "
                             "non-finite values (NaN or inf). Score finite features.")
        return torch.from_numpy(vals), idx


def kth_similarity(q: torch.Tensor, bank: torch.Tensor, k: int, search: Float32Search | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """The exact k-th largest similarity q_i^T b_j over the rows of ``bank`` (module docstring), float64.

    ``q`` (N x D) and ``bank`` (n x D) are float64 with unit rows; ``search`` reuses a bank's
    :class:`Float32Search` (else one is built with ``backend``)."""
    n, d = bank.shape
    search = Float32Search(bank, backend) if search is None else search
    m = min(n, 2 * k + 8)
    err = float32_error(d)
    top, idx = search.top(q.float(), m)
    out = torch.empty(q.shape[0], dtype=torch.float64)
    for lo in range(0, q.shape[0], CERTIFY_ROWS):
        qb, tb, ib = q[lo:lo + CERTIFY_ROWS], top[lo:lo + CERTIFY_ROWS].double(), idx[lo:lo + CERTIFY_ROWS]
        sk = tb[:, k - 1:k]
        above = (tb > sk + 2 * err).sum(1)
        band = ((tb - sk).abs() <= 2 * err).sum(1)
        width = int(band.max())
        pos = (above[:, None] + torch.arange(width)[None, :]).clamp_max(m - 1)
        cand = torch.einsum("rd,rwd->rw", qb, bank[ib.gather(1, pos)])
        cand = cand.masked_fill(torch.arange(width)[None, :] >= band[:, None], -math.inf)
        kth = cand.sort(dim=1, descending=True).values.gather(1, (k - 1 - above)[:, None]).squeeze(1)
        if m < n:
            bad = torch.nonzero(above + band >= m).reshape(-1)
            if bad.numel():
                kth[bad] = torch.topk(qb[bad] @ bank.T, k, dim=1).values[:, -1]
        out[lo:lo + CERTIFY_ROWS] = kth
    return out
