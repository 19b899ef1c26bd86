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
   the candidates has an exact similarity <= s_m + err < s_k - err <= t (true when its float32
   similarity is <= s_m); the other queries (near-ties over 2k neighbours) are recomputed against the
   whole bank in float64.

Three candidate searches give the same certified values (all compute float32 dot products with the
bound of step 1; tests check they agree with the float64 brute force and with each other):

* ``"torch"`` (always available): float32 matmul in blocks of ``KNN_BLOCK`` entries, then ``torch.topk``;
* ``"faiss"`` (optional: ``pip install uvood[faiss]``, faiss-cpu): ``faiss.IndexFlatIP``, faiss's exact
  (brute-force) inner-product search, BLAS sgemm fused with a heap selection, run with
  ``torch.get_num_threads()`` threads. Never an approximate index.
* ``"pruned"``: an exact search that skips the parts of the bank that cannot reach a query's top m
  (below), and searches by brute force (faiss when installed, else torch) the queries for which
  skipping does not pay.

``"auto"`` (the default) takes faiss when it is installed, torch otherwise: on real features the
pruned search was measured only slightly faster than faiss, and slower on OOD queries and random
vectors (docs/field_detectors.md), so it is an option, not the default.

Pruned search (:class:`Partition`). Built once per bank, lazily: a seeded spherical k-means splits the
rows into cones of about ``CLUSTER_SIZE`` rows, with unit axes u_c (stored in float32, |u_c| ~ 1); each
row b gets cos(theta_b) = b^T u_c / (|b| |u_c|), computed in float64 and rounded down by 1e-12 (> its
float64 error D 2^-53), so theta_b >= the true angle between b and u_c. A cone's rows, sorted by
increasing theta_b, are cut into units of ``UNIT`` rows; a unit's angle theta_U is its largest theta_b.
The bound: for a unit query q at angle alpha from u_c, the angle between q and any b of the unit is
>= alpha - theta_b >= alpha - theta_U (triangle inequality of angles on the sphere), so

    q^T b <= UB(q, U) = cos(max(0, alpha - theta_U))   (a spherical cap bound; cos decreases on [0, pi]),

and for a row of norm rho <= 1 (the zero rows ``l2_normalise`` leaves): q^T b = rho q^T b/|b| <=
max(0, UB). UB grows with theta_U, so along a cone it grows from unit to unit. Rounding: fl32(q32^T u_c)
is within err |u_c| of q^T u_c (step 1's bound; only q is rounded), and the float32 division by |u_c|
adds < 1e-6, so c = (fl32(q32^T u_c) + err |u_c|) / |u_c| + ``SLACK`` >= cos(alpha) (SLACK = 1e-5 also
covers |q| = 1 +- 1e-6: queries further from unit norm, or not finite, are searched by brute force);
UB is monotone in c, and its float32 evaluation c cos(theta_U) + sqrt((1 - c)(1 + c)) sin(theta_U)
(no cancellation under the root) is within 1e-6 of the exact value, covered by a second SLACK.

Search (:meth:`Partition.top`), for m candidates per query:

1. probe: each query computes its float32 similarities to the whole of its ``PROBE_ROWS * m /
   CLUSTER_SIZE`` cones of largest bound; tau, the m-th largest of them, is <= the final s_m (the m-th
   largest of a subset);
2. a query whose other units with UB > tau hold more than ``BRUTE_FRACTION`` of the bank (random
   vectors, queries far from every cone) is searched by brute force instead: the pruned path costs
   several times more per similarity than faiss's; 0.25 was measured faster than 0.15 on the
   fashionmnist-cnn features (3.3 s against 4.1 s of CPU, 10,000 test queries, 50,000 references);
3. every other query computes, in each other cone, its similarities to the rows from its first unit
   with UB > tau to the cone's end (a superset of its units with UB > tau, since UB grows along the
   cone), one matmul per starting unit with the queries that start there; values >= tau enter a
   buffer of ``BUFFER * m`` per query, cut to its m largest when full (tau becomes their m-th, still
   <= the final s_m).

Claim: the certificate's premise holds, every row b outside the final m candidates has exact q^T b <=
s_m + err. Proof: a computed row outside the candidates has fl32(q^T b) < tau <= s_m, or was cut or
left out of the final m, so fl32(q^T b) <= s_m and q^T b <= s_m + err (step 1). A row never computed
lies in a unit with UB <= tau <= s_m, so q^T b <= UB <= s_m. No row is computed twice (the probe's cones
are excluded from step 3), so the candidates are m distinct rows with their float32 values, as a brute
force would give them (up to the summation order, which step 1's bound covers), and step 2 certifies
them unchanged: the values never depend on the partition, only the time does.
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
#: rows per unit (a cone's rows of decreasing cos theta cut into units of UNIT rows)
UNIT = 64
#: the probe visits each query's units of largest bound holding about PROBE_ROWS * m rows
PROBE_ROWS = 12
#: similarities kept per query between two cuts to its m largest, in multiples of m
BUFFER = 4
#: spherical k-means iterations (seeded; the partition changes speed, never a value)
KMEANS_ITERS = 10
#: a query needing more than this fraction of the bank after the probe is searched by brute force (measured)
BRUTE_FRACTION = 0.25
#: absolute margin added to cos(alpha) and to the cone bound for their float32 evaluation (module docstring)
SLACK = 1e-5


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
    cones cut into units of UNIT rows, built once, and the m largest float32 similarities per query,
    computed only in the units whose bound can reach the query's top m (module docstring, "Pruned search")."""

    def __init__(self, bank: torch.Tensor, bank32: torch.Tensor):
        n, d = bank32.shape
        self.n, self.d = n, d
        assign, u32 = spherical_kmeans(bank32, max(1, min(n // CLUSTER_SIZE, MAX_CLUSTERS)))
        self.u32, unorm = u32, u32.double().norm(dim=1)
        # cos theta_b of every row to its cone's axis, rounded down (float64, |error| <= D 2^-53 << 1e-12)
        norm = bank.norm(dim=1)
        cos_b = (bank * u32.double()[assign]).sum(1) / (unorm[assign] * norm.clamp_min(1e-300))
        cos_b = (cos_b - 1e-12).clamp(-1.0, 1.0)
        # rows sorted by cone, then by decreasing cos theta_b; each cone cut into units of UNIT rows
        self.order = torch.from_numpy(np.lexsort((-cos_b.numpy(), assign.numpy()))).long()
        self.bank32 = bank32[self.order].contiguous()
        sizes = torch.bincount(assign, minlength=u32.shape[0]).tolist()
        self.bounds, cone, start = [], [], 0
        for c, size in enumerate(sizes):
            self.bounds += [(lo, min(lo + UNIT, start + size)) for lo in range(start, start + size, UNIT)]
            cone += [c] * math.ceil(size / UNIT)
            start += size
        lo, hi = torch.tensor([b[0] for b in self.bounds]), torch.tensor([b[1] for b in self.bounds])
        self.lo, self.cone, self.size = lo, torch.tensor(cone), (hi - lo).float()
        ct = cos_b[self.order][hi - 1]  # the unit's widest angle: its last (smallest) cos theta_b
        self.cos_t, self.sin_t = ct.float(), (1.0 - ct * ct).clamp_min(0.0).sqrt().float()
        short = torch.cat([torch.zeros(1), torch.cumsum((norm[self.order] < 1.0 - 1e-9).double(), 0)])
        self.floor = torch.where(short[hi] > short[lo], 0.0, -math.inf).float()  # rows of norm < 1: max(0, UB)
        self.unorm = unorm.float()
        cone_lo = {}
        for u, c in enumerate(cone):
            cone_lo.setdefault(c, u)
        self.cone_first = torch.tensor([cone_lo.get(c, 0) for c in range(u32.shape[0])])  # first unit of each cone
        self.cone_end = [self.bounds[u][1] for u in range(len(self.bounds))]  # end row of each unit's cone
        for u in range(len(self.bounds) - 2, -1, -1):
            if cone[u] == cone[u + 1]:
                self.cone_end[u] = self.cone_end[u + 1]

    def upper_bounds(self, q32: torch.Tensor, err: float) -> torch.Tensor:
        """UB(q, U) of the module docstring for every query and unit (N x units, float32, slack included)."""
        ca = ((q32 @ self.u32.T + err * self.unorm) / self.unorm + SLACK).clamp_(-1.0, 1.0)  # >= cos(alpha)
        sa = ((1.0 - ca) * (1.0 + ca)).sqrt_()
        c = ca[:, self.cone]
        ub = torch.addcmul(c * self.cos_t, sa[:, self.cone], self.sin_t)
        ub.masked_fill_(c >= self.cos_t, 1.0)
        return torch.maximum(ub, self.floor, out=ub).add_(SLACK)

    def _visit(self, q32, pair_q, pair_u, buf):
        """Add to ``buf`` the float32 similarities of query pair_q[i] to the rows from unit pair_u[i] to the end
        of its cone: one matmul per start unit with the queries that start there. Returns similarities computed."""
        order = torch.argsort(pair_u, stable=True)
        pair_q = pair_q[order]
        counts = torch.bincount(pair_u, minlength=len(self.bounds)).tolist()
        done = start = 0
        for u, cnt in enumerate(counts):
            if cnt:
                lo, hi = self.bounds[u][0], self.cone_end[u]
                qs = pair_q[start:start + cnt]
                buf.add(qs, q32.index_select(0, qs) @ self.bank32[lo:hi].T, lo)
                done += cnt * (hi - lo)
                start += cnt
        return done

    def top(self, q32, m, brute, stats):
        """The m largest float32 similarities (values sorted in decreasing order, bank rows) of every query:
        1. probe: the query's ``first`` cones of largest bound, whole; the m-th largest of their values, tau,
           is a lower bound of the final m-th value;
        2. a query whose units with UB > tau in other cones hold more than BRUTE_FRACTION of the bank goes to
           ``brute``;
        3. every other query visits, in every other cone, the rows from its first unit with UB > tau to the
           cone's end (UB grows with theta along a cone, so these hold every unit with UB > tau)."""
        nq, n, cones = q32.shape[0], self.n, self.u32.shape[0]
        first = math.ceil(PROBE_ROWS * m / CLUSTER_SIZE)  # cones holding about PROBE_ROWS * m rows
        if first * 2 >= cones:  # the probe alone would visit half the bank
            stats.update(similarities=nq * n, brute_queries=nq)
            return brute(q32, m)
        ub = self.upper_bounds(q32, float32_error(self.d))
        ub[~((q32.double().norm(dim=1) - 1.0).abs() <= 1e-6)] = math.inf  # not unit (or not finite): brute force
        cone_ub = torch.full((nq, cones), -math.inf).scatter_reduce_(1, self.cone.expand(nq, -1), ub, "amax")
        near = torch.topk(cone_ub, first, dim=1).indices
        buf = Buffer(torch.full((nq, m), -math.inf), torch.full((nq, m), -1, dtype=torch.int64), BUFFER * m)
        done = self._visit(q32, torch.arange(nq).repeat_interleave(first), self.cone_first[near].reshape(-1), buf)
        skip = torch.zeros(nq, cones, dtype=torch.bool).scatter_(1, near, True)[:, self.cone]
        need = ~(ub <= buf.tau[:, None]) & ~skip  # NaN bounds (non-finite queries) are visited
        far = (need.float() @ self.size) > BRUTE_FRACTION * n
        need[far] = False
        # per (query, cone): the first unit needed (the units of a cone are in increasing order)
        start = torch.full((nq, cones), len(self.bounds), dtype=torch.int64).scatter_reduce_(
            1, self.cone.expand(nq, -1), torch.where(need, torch.arange(len(self.bounds)), len(self.bounds)), "amin")
        q_of, c = torch.nonzero(start < len(self.bounds), as_tuple=True)
        done += self._visit(q32, q_of, start[q_of, c], buf)
        vals, rows = buf.top()
        idx = self.order[rows.clamp_min(0)]
        brute_q = torch.nonzero(far).reshape(-1)
        if brute_q.numel():
            vals[brute_q], idx[brute_q] = brute(q32[brute_q], m)
            done += brute_q.numel() * n
        stats.update(similarities=done, brute_queries=int(brute_q.numel()))
        return vals, idx


class Buffer:
    """Per query, the float32 similarities >= tau seen so far (at most ``width``) and their rows, tau a lower
    bound of the query's final m-th value: the m-th largest of the values kept when the buffer was last cut."""

    def __init__(self, vals: torch.Tensor, rows: torch.Tensor, width: int):
        nq, self.m = vals.shape
        self.vals = torch.full((nq, width), -math.inf, dtype=torch.float32)
        self.rows = torch.full((nq, width), -1, dtype=torch.int64)
        self.vals[:, :self.m], self.rows[:, :self.m] = vals, rows
        self.fill = torch.full((nq,), self.m, dtype=torch.int64)
        self.tau = vals.amin(1)
        self.cuts = 0

    def _cut(self, qs):
        """Keep the m largest values of the queries ``qs``; tau becomes their m-th."""
        v, pos = torch.topk(self.vals[qs], self.m, dim=1, sorted=False)
        r = self.rows[qs].gather(1, pos)
        self.vals[qs] = -math.inf
        self.vals[qs, :self.m], self.rows[qs, :self.m] = v, r
        self.fill[qs], self.tau[qs] = self.m, v.amin(1)
        self.cuts += qs.numel()

    def add(self, qs, sim, lo):
        """Add the values >= tau of ``sim`` (queries ``qs`` x bank rows lo, lo + 1, ...)."""
        step = self.vals.shape[1] - self.m
        if sim.shape[1] > step:
            for at in range(0, sim.shape[1], step):
                self.add(qs, sim[:, at:at + step], lo + at)
            return
        keep = sim >= self.tau.index_select(0, qs)[:, None]
        count = keep.sum(1)
        full = torch.nonzero(self.fill.index_select(0, qs) + count > self.vals.shape[1]).reshape(-1)
        if full.numel():
            self._cut(qs[full])
            keep = sim >= self.tau.index_select(0, qs)[:, None]
            count = keep.sum(1)
        i, j = torch.nonzero(keep, as_tuple=True)
        if i.numel() == 0:
            return
        at = (self.fill.index_select(0, qs)[:, None] + torch.cumsum(keep, 1) - 1)[i, j]
        self.vals[qs[i], at] = sim[i, j]
        self.rows[qs[i], at] = j + lo
        self.fill.index_add_(0, qs, count)

    def top(self):
        """(values sorted in decreasing order, rows), N x m."""
        vals, pos = torch.topk(self.vals, self.m, dim=1)
        return vals, self.rows.gather(1, pos)


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
