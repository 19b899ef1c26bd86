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

Three candidate searches give the same certified values (all compute float32 dot products with the
bound of step 1; tests check they agree with the float64 brute force and with each other):

* ``"torch"`` (always available): float32 matmul in blocks of ``KNN_BLOCK`` entries, then ``torch.topk``;
* ``"faiss"`` (optional: ``pip install uvood[faiss]``, faiss-cpu): ``faiss.IndexFlatIP``, faiss's exact
  (brute-force) inner-product search, BLAS sgemm fused with a heap selection, run with
  ``torch.get_num_threads()`` threads. Never an approximate index.
* ``"pruned"``: an exact search that skips the parts of the bank that cannot reach a query's top m
  (below), and searches by brute force (faiss when installed, else torch) the queries for which
  skipping does not pay.

``"auto"`` (the default) takes faiss when it is installed, torch otherwise.

Pruned search (:class:`Partition`). Built once per bank, lazily: a seeded spherical k-means splits the
rows into cones of about ``CLUSTER_SIZE`` rows, with unit axes u_c (stored in float32, |u_c| ~ 1); each
row b gets cos(theta_b) = b^T u_c / (|b| |u_c|), computed in float64 and rounded down by 1e-12 (> its
float64 error D 2^-53), so theta_b >= the true angle between b and u_c. A cone's rows, sorted by
increasing theta_b, are cut into ``SHELLS`` units; a unit's angle theta_U is the largest theta_b of
its rows. The bound: for a unit query q at angle alpha from u_c, the angle between q and any b of the
unit is >= alpha - theta_b >= alpha - theta_U (triangle inequality of angles on the sphere), so

    q^T b <= UB(q, U) = cos(max(0, alpha - theta_U))   (a spherical cap bound; cos decreases on [0, pi]),

and for a row of norm rho <= 1 (the zero rows ``l2_normalise`` leaves): q^T b = rho q^T b/|b| <=
max(0, UB). alpha is rounded down through cos(alpha) rounded up: fl32(q32^T u_c) is within err |u_c| of
q^T u_c (step 1's Higham bound; only q is rounded), so cos(alpha) <= (fl32(q32^T u_c) + err |u_c|) /
|u_c| + 1e-12, and UB is evaluated in float64 from these, plus ``BOUND_SLACK`` = 1e-9 for its own
rounding (<= 1e-15). Queries not of unit norm (within 1e-5) are searched by brute force.

Search: every query visits its units in decreasing order of UB, in rounds (``ROUNDS``): one matmul per
unit with the queries that visit it, merged into a running float32 top m; a unit is skipped when its
UB <= the query's current m-th value tau. Claim: the certificate's premise holds, i.e. every row b
outside the final m candidates has exact q^T b <= s_m + err. Proof: tau only grows and never exceeds the
final s_m (it is the m-th largest of a subset of the computed values). A computed row outside the
candidates has fl32(q^T b) <= s_m, so q^T b <= s_m + err (step 1). A skipped row lies in a unit with
UB <= tau <= s_m, so q^T b <= UB <= s_m. Rows in units after a query's last round are skipped by the
same test. The float32 values and their rows are what a brute force would compute for those rows (up
to the summation order, which step 1's bound covers), so step 2 certifies them unchanged; the values
never depend on the partition, only the time does. After the first round, a query whose remaining
units with UB > tau hold more than ``BRUTE_FRACTION`` of the bank is searched by brute force instead
(random vectors, queries far from every cone).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

from ..errors import UvoodError

#: entries per block of the float32 similarity matrix, queries x references (memory bound; no effect on values)
KNN_BLOCK = 2**25

#: queries per block of the float64 certificate (memory bound; no effect on values)
CERTIFY_ROWS = 1024

BACKENDS = ("auto", "torch", "faiss", "pruned")

#: rows per cone of the pruned search's partition (k = n // CLUSTER_SIZE cones, at most MAX_CLUSTERS)
CLUSTER_SIZE = 256
MAX_CLUSTERS = 4096
#: units (shells of decreasing cos theta) per cone; nearest cones probed first per query
SHELLS = 4
#: rounds of the search: the first visits each query's units of largest bound holding ~PROBE_ROWS * m rows,
#: round r ROUNDS[r] times as many units (0: all that are left)
PROBE_ROWS = 2
ROUNDS = (1, 4, 16, 0)
#: spherical k-means iterations (seeded; the partition changes speed, never a value)
KMEANS_ITERS = 10
#: a query needing more than this fraction of the bank after the probe is searched by brute force
BRUTE_FRACTION = 0.5
#: absolute margin on the cone bound for the float64 rounding of its own evaluation (<< float32 error)
BOUND_SLACK = 1e-9


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
    module docstring), with the bank's float32 copy (and faiss index, or pruning partition) built once
    and reused. ``stats`` (after :meth:`top`): similarities computed, queries searched by brute force."""

    def __init__(self, bank: torch.Tensor, backend: str = "auto"):
        self.bank, self.requested = bank, backend
        self.backend = resolve_backend(backend)
        self.brute = ("faiss" if faiss_available() else "torch") if self.backend == "pruned" else self.backend
        self.bank32 = bank.float().contiguous()
        self._index = None
        self._partition = None
        self.stats = {}

    def top(self, q32: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, rows), both N x m, values float32 sorted in decreasing order."""
        if self.backend == "pruned":
            if self._partition is None:
                self._partition = Partition(self.bank, self.bank32)
            return self._partition.top(q32, m, self._top_brute, self.stats)
        self.stats = {"similarities": q32.shape[0] * self.bank32.shape[0], "brute_queries": q32.shape[0]}
        return self._top_brute(q32, m)

    def _top_brute(self, q32, m):
        if self.brute == "faiss":
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


def spherical_kmeans(x32: torch.Tensor, k: int, iters: int = KMEANS_ITERS, seed: int = 0):
    """Seeded spherical k-means of unit rows: (assignment, k unit float32 axes). Assign each row to the
    axis of largest cosine; an axis becomes its rows' normalised mean (an empty cone keeps its axis)."""
    g = torch.Generator().manual_seed(seed)
    u = x32[torch.randperm(x32.shape[0], generator=g)[:k]].clone()
    for it in range(iters + 1):
        assign = torch.empty(x32.shape[0], dtype=torch.int64)
        step = max(1, KNN_BLOCK // k)
        for lo in range(0, x32.shape[0], step):
            assign[lo:lo + step] = (x32[lo:lo + step] @ u.T).argmax(1)
        if it == iters:
            return assign, u
        s = torch.zeros_like(u).index_add_(0, assign, x32)
        norm = s.norm(dim=1, keepdim=True)
        u = torch.where(norm > 0, s / norm.clamp_min(1e-30), u)


class Partition:
    """The exact pruned candidate search (``"pruned"``): a spherical k-means partition of the bank into
    cones, built once, and the m largest float32 similarities per query, computed only where a cone's
    bound says they can reach the query's top m (module docstring, "Pruned search")."""

    def __init__(self, bank: torch.Tensor, bank32: torch.Tensor):
        n, d = bank32.shape
        self.n, self.d = n, d
        k = max(1, min(n // CLUSTER_SIZE, MAX_CLUSTERS))
        assign, u32 = spherical_kmeans(bank32, k)
        self.u32, self.unorm = u32, u32.double().norm(dim=1)
        # cos theta_b of every row to its cone's axis, rounded down (float64, |error| <= D 2^-53 << 1e-12)
        norm = bank.norm(dim=1)
        cos_j = (bank * u32.double()[assign]).sum(1) / (self.unorm[assign] * norm.clamp_min(1e-300))
        cos_j = (cos_j - 1e-12).clamp(-1.0, 1.0)
        # rows sorted by cone, then by decreasing cos theta_j: each cone is SHELLS contiguous units
        self.order = torch.from_numpy(np.lexsort((-cos_j.numpy(), assign.numpy()))).long()
        self.bank32 = bank32[self.order].contiguous()
        sizes = torch.bincount(assign, minlength=k)
        starts = torch.cumsum(sizes, 0) - sizes
        lo, hi, cone = [], [], []
        for c, (a, z) in enumerate(zip(starts.tolist(), (starts + sizes).tolist())):
            cuts = torch.linspace(a, z, SHELLS + 1).round().long().tolist()
            for u_lo, u_hi in zip(cuts[:-1], cuts[1:]):
                if u_hi > u_lo:
                    lo.append(u_lo), hi.append(u_hi), cone.append(c)
        self.lo, self.hi, self.cone = torch.tensor(lo), torch.tensor(hi), torch.tensor(cone)
        self.size = (self.hi - self.lo).double()
        ct = cos_j[self.order][self.hi - 1]  # the unit's widest angle: its last (smallest) cos theta_j
        self.cos_t, self.sin_t = ct, (1.0 - ct * ct).clamp_min(0.0).sqrt()
        short = torch.cat([torch.zeros(1), torch.cumsum((norm[self.order] < 1.0 - 1e-9).double(), 0)])
        self.floor = torch.where(short[self.hi] > short[self.lo], 0.0, -math.inf)  # rows of norm < 1: max(0, UB)
        self.cone_lo, self.cone_hi = starts, starts + sizes

    def upper_bounds(self, q32: torch.Tensor, err: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos alpha, rounded up: N x cones; the bound on q^T b over each unit's rows, N x units)."""
        ca = ((q32 @ self.u32.T).double() + err * self.unorm) / self.unorm + 1e-12
        ca = ca.clamp(-1.0, 1.0)
        c, ct, st = ca[:, self.cone], self.cos_t[None, :], self.sin_t[None, :]
        ub = torch.where(c >= ct, 1.0, c * ct + (1.0 - c * c).clamp_min(0.0).sqrt() * st)
        return ca, torch.maximum(ub, self.floor[None, :]) + BOUND_SLACK

    def _visit(self, q32, pair_q, pair_u, vals, idx):
        """Merge into the running top m (``vals``, ``idx``, N x m) the float32 similarities of query
        ``pair_q[i]`` to the rows of unit ``pair_u[i]``: unit by unit, one matmul with the queries that need
        it; only queries with a value above their current m-th enter the merge. Returns similarities computed."""
        m = vals.shape[1]
        order = torch.argsort(pair_u, stable=True)
        pair_q, counts = pair_q[order], torch.bincount(pair_u, minlength=self.lo.numel())
        done, start = 0, 0
        for u in torch.nonzero(counts).reshape(-1).tolist():
            cnt, lo, hi = int(counts[u]), int(self.lo[u]), int(self.hi[u])
            qs = pair_q[start:start + cnt]
            start += cnt
            sim = q32.index_select(0, qs) @ self.bank32[lo:hi].T
            done += sim.numel()
            hit = sim.amax(1) > vals[:, m - 1].index_select(0, qs)
            n_hit = int(hit.sum())
            if n_hit == 0:
                continue
            if n_hit < cnt:
                hit = torch.nonzero(hit).reshape(-1)
                qs, sim = qs.index_select(0, hit), sim.index_select(0, hit)
            v, pos = torch.topk(torch.cat([vals.index_select(0, qs), sim], 1), m, dim=1)
            rows = torch.cat([idx.index_select(0, qs), torch.arange(lo, hi).expand(qs.numel(), hi - lo)], 1)
            vals.index_copy_(0, qs, v)
            idx.index_copy_(0, qs, rows.gather(1, pos))
        return done

    def top(self, q32, m, brute, stats):
        """The m largest float32 similarities (values, bank rows) of every query, searched in rounds: each
        query visits its units in decreasing order of their bound, ROUNDS[r] of them in round r, skipping
        units whose bound is <= its current m-th value; after the first round, a query whose remaining units
        hold more than BRUTE_FRACTION of the bank is searched by ``brute`` instead."""
        nq = q32.shape[0]
        if PROBE_ROWS * m >= BRUTE_FRACTION * self.n:  # the first round alone would visit that much
            stats.update(similarities=nq * self.n, brute_queries=nq)
            return brute(q32, m)
        vals = torch.full((nq, m), -math.inf, dtype=torch.float32)
        idx = torch.full((nq, m), -1, dtype=torch.int64)
        _, ub = self.upper_bounds(q32, float32_error(self.d))
        ub[~((q32.double().norm(dim=1) - 1.0).abs() <= 1e-5)] = math.inf  # not unit (or not finite): brute force
        ub, rank = torch.sort(ub, dim=1, descending=True)
        done, brute_q, lo = 0, torch.zeros(0, dtype=torch.int64), 0
        active = torch.arange(nq)
        first = math.ceil(PROBE_ROWS * m * self.lo.numel() / self.n)  # units of ~PROBE_ROWS * m rows
        for r in range(len(ROUNDS)):
            hi = min(lo + first * ROUNDS[r], rank.shape[1]) if ROUNDS[r] else rank.shape[1]
            thr = vals[active, m - 1:].double()
            if r == 1:  # the measured fraction of the bank a query still needs decides brute force
                left = (ub[active, lo:] > thr) * self.size[rank[active, lo:]]
                far = left.sum(1) > BRUTE_FRACTION * self.n
                brute_q, active, thr = active[far], active[~far], thr[~far]
            go = ~(ub[active, lo:hi] <= thr)  # NaN bounds (non-finite queries) are visited
            q_of, col = torch.nonzero(go, as_tuple=True)
            done += self._visit(q32, active[q_of], rank[active[q_of], lo + col], vals, idx)
            if hi == rank.shape[1]:
                break
            active = active[~(ub[active, hi] <= vals[active, m - 1].double())]
            lo = hi
        idx = self.order[idx.clamp_min(0)]
        if brute_q.numel():
            vals[brute_q], idx[brute_q] = brute(q32[brute_q], m)
            done += brute_q.numel() * self.n
        stats.update(similarities=done, brute_queries=int(brute_q.numel()))
        return vals, idx


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
