"""The k-th largest similarity of each query to a bank of unit vectors, for KNN (Sun et al., ICML 2022):
exact in float64, searched in float32.

What is exact: for float64 queries q_i and bank rows b_j, all of unit norm, :func:`kth_similarity`
returns t_i = the k-th largest of the float64 dot products q_i^T b_j, the value of the float64 brute
force ``torch.topk(q @ bank.T, k).values[:, -1]`` up to the rounding of one float64 dot product (its
summation order, |error| <= D 2^-53). Which neighbour is the k-th is certified, never guessed:

1. Candidates: the m = min(n, 2k + 8) largest float32 similarities s_1 >= ... >= s_m per query and
   their bank rows. A float32 similarity of unit vectors (inputs rounded to float32, D products summed
   in any order, with or without fused multiply-adds) is within err = (D + 4) 2^-24 of the exact one
   (Higham, "Accuracy and Stability of Numerical Algorithms", Eq. 3.5: |fl(x^T y) - x^T y| <= gamma_D
   sum_i |x_i y_i|, for any order of the sum; an FMA rounds once where a multiply and an add round
   twice). The bound holds for any BLAS that forms each entry as a dot product (OpenBLAS's and MKL's
   sgemm block and vectorise the sum, i.e. change its order; no Strassen-like algorithm is used), which
   is why the matmuls may run in numpy's BLAS rather than torch's.
2. Certificate: with s_k the float32 k-th value, the exact k-th value t lies in [s_k - err, s_k + err].
   Candidates with s_j > s_k + 2 err are above t, those with s_j < s_k - 2 err below it; t is the
   (k - A)-th largest float64 value of the candidates in the band |s_j - s_k| <= 2 err (A = how many
   lie above the band). This holds when the band ends before s_m (or m = n), since every row outside
   the candidates has an exact similarity <= s_m + err < s_k - err <= t (the *premise*, which every
   search below guarantees); the other queries (near-ties over 2k neighbours) are recomputed against the
   whole bank in float64. The band's candidates are recomputed one dot product each.

Searches (``backend``; all give the same certified values, tests check them against the float64 brute
force and against each other):

* ``"brute"`` (``"torch"`` is its older name): every similarity, float32 matmuls in numpy's BLAS;
* ``"pruned"``: an exact search that computes only the chunks of the bank whose bound can reach a
  query's top m (below);
* ``"auto"`` (the default): ``"pruned"``, or when the bank has no low-rank structure (median residual norm
  > ``PRUNE_RESIDUAL``: the bounds would prune nothing, e.g. random vectors) a brute force: faiss's when it
  is installed (measured faster than ``"brute"`` there), else ``"brute"``. With faiss installed, "auto" also
  hands the rest of a call to faiss once a block of queries had the pruned search compute more than
  ``AUTO_SWITCH_SHARE`` of its similarities (queries far from a less low-rank bank);
* ``"faiss"`` (optional: ``pip install uvood[faiss]``): ``faiss.IndexFlatIP``, faiss's exact brute force.

Matmuls: numpy's BLAS (OpenBLAS, Haswell kernels here) ran the float32 similarity matmul about twice as
fast as torch's (MKL) on this AVX2 CPU (1 thread: 0.70 s against 1.43 s for 2,000 x 50,000 x 256), so
every float32 matmul here goes through numpy (``torch.from_numpy`` / ``.numpy()`` share memory), run
with ``torch.get_num_threads()`` threads (:func:`blas_threads`, threadpoolctl).

Layout (:class:`Tiled`, built once per bank, lazily): the rows in a search order (``"pruned"``: a seeded
spherical k-means into cones of about ``CLUSTER_SIZE`` rows, each cone's rows by decreasing cosine to its
axis; ``"brute"``: the bank's order), cut into tiles of ``TILE`` consecutive rows, tiles grouped into
chunks of ``CHUNK`` rows (``BRUTE_CHUNK`` for the brute force). Inside a chunk, row j of tile t is stored
at j * (tiles per chunk) + t, so that the tile maxima of a block of similarities are a maximum over TILE
contiguous slices (:func:`tile_max`, by halving). The last chunk is padded with zero rows whose similarities
are set to -inf. The pruned search's projections y (below) are stored in the same layout.

Selection: the m largest values of a query lie in its m tiles of largest maximum (each such tile holds a
value >= the m-th largest tile maximum M_m; any other tile's values are <= M_m, and the m tiles hold m
distinct values >= M_m). So: tile maxima of the computed chunks (-inf elsewhere), ``topk`` of the tiles,
then the m largest of their m * TILE values (a tile not computed, when fewer than m are, contributes -inf):
two small selections instead of a top-m over n values.

Bound (``"pruned"``; :func:`principal_basis`, :meth:`Tiled.bounds`). P is the bank's rank-R principal
basis (R = ``RANK`` or D / 4; top eigenvectors of bank^T bank, float64), x = P^T q, y = P^T b, and
q_R = q - P x, b_R = b - P y. Then q^T b = x^T y + q_R^T b_R + c with |c| <= e_P |q| |b| (e_P = 2 ||P^T P
- I||_F + 1e-12, measured when P is built: the cross terms of an orthonormal-up-to-rounding P), so by
Cauchy-Schwarz

    x^T y - |q_R| |b_R| - e_P <= q^T b <= x^T y + |q_R| |b_R| + e_P      (|q|, |b| <= 1).

Per tile T, with M_T = the largest float32 x^T y over its rows (within float32_error(R) |q| of the exact
x^T y: step 1's bound at width R; x, y rounded to float32) and rho_T = the largest |b_R| of its rows:

    UB_T = M_T + g >= q^T b for every row b of T,    LB_T = M_T - g <= q^T b* for its row b* of largest x^T y,
    g = |q_R| rho_T + float32_error(R) max(1, |q|) + 2^-23 |q| + e_P + SLACK,

the 2^-23 |q| covering a query given in float32, SLACK = 1e-6 the float32 evaluation of M_T +- g. The
bound holds for queries of any norm (only float32_error assumes |q| <= 1, hence max(1, |q|)). Real
penultimate features are close to a low-rank subspace (fashionmnist-cnn, D = 256: 96 % of the energy in
32 directions, median |b_R| 0.19), so g is small and the bound tight. (The search uses UB_T only.)

Shell bound (:meth:`Tiled.shell_bounds`; float64, a few operations per query and chunk). A row b of cone a
(unit axis u_a) has the angle phi_b = arccos(b^T u_a / |b|) in [0, pi] to the axis; the rows of one chunk in
one cone (a *segment*; a chunk holds one or a few) have angles in [phi_lo, phi_hi] and norms in [n_lo,
n_hi]. For a query q at angle theta to u_a, the angle between q and b is at least |theta - phi_b| (triangle
inequality of the angle on the sphere), so at least delta = dist(theta, [phi_lo, phi_hi]) in [0, pi], and as
cos decreases on [0, pi]:

    q^T b = |q| |b| cos angle(q, b) <= |q| |b| cos delta <= |q| (n_hi if cos delta >= 0 else n_lo) cos delta.

UB_C is the largest of these over the chunk's segments, plus SHELL_SLACK = 1e-9. Rounding: with a = 1e-12 +
(D + 4) 2^-52 (``ANGLE_MARGIN`` + the float64 error of a cosine of width D, Higham Eq. 3.5, u_a normalised in
float64), every cosine (rows' and queries') is widened by a before arccos (monotone), every angle by a after
it (arccos's own rounding), cos delta is raised by a, and SHELL_SLACK covers the products (relative
rounding 1e-15 |q|: |q| <= 1e6). A zero row gets [0, pi]; a zero query gets UB_C = SHELL_SLACK >= 0. Each cone's rows
are ordered by decreasing cosine to its axis, so a segment is a thin shell (fashionmnist-cnn: median width
0.035 rad) and chunks of cones far from the query are excluded at once.

Pruned search (:meth:`Tiled._pruned`, :meth:`Tiled._select`), per block of queries, a chunk computed at most
once per query (one float32 matmul per chunk with the queries that need it, :meth:`Tiled._sims`):

1. the ``FIRST_CHUNKS`` (or enough for 2m values) chunks of largest mean similarity q^T mean(b) (a guess:
   any choice is exact) are computed; s' = the m-th largest float32 value computed (-inf when fewer than m);
2. UB_C for every chunk; the chunks not yet computed with UB_C > s' are *bounded*: M_T of their tiles (one
   float32 matmul of width R per chunk, :meth:`Tiled.bounds`); the ``SECOND_CHUNKS`` (idem) bounded chunks
   of largest M_T are computed; tau = the m-th largest float32 value computed in 1 and 2 (>= s');
3. every other bounded chunk with a tile of UB_T > tau is computed; then the selection above.

Claim: the certificate's premise holds. Proof: let s_m be the m-th largest computed value. The rows computed
in 1 and 2 are among the computed rows, so s_m >= tau >= s'. A row never computed lies either in a chunk
never bounded, with q^T b <= UB_C <= s' <= s_m, or in a bounded chunk whose tiles all have UB_T <= tau, so
q^T b <= tau <= s_m. A computed row outside the candidates has fl32(q^T b) <= s_m, so q^T b <= s_m + err.
(When fewer than m values are computed in 1 and 2, s' = tau = -inf: every chunk is bounded and every tile
holding a row computed, a brute force.) No row is computed twice, so the candidates are m distinct rows with
their float32 values, as the brute force gives them up to the summation order (covered by step 1): the
values never depend on the layout or the bounds, only the time does.

Measured (fashionmnist-cnn features, 50,000 x 256 bank, k = 50, 1 thread; ``benchmarks/field_speed.py``):
the pruned search computes about 10 % of the similarities for ID queries (Fashion-MNIST test) and 15 % for
OOD ones (MNIST test), and the rank-R bound for about 20 % / 32 % of the rows.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math

import numpy as np
import torch

from ..errors import UvoodError

#: entries per block of float32 similarities, queries x bank positions (memory bound; no effect on values)
KNN_BLOCK = 2**23

#: queries per block of the float64 certificate (memory bound; no effect on values)
CERTIFY_ROWS = 1024

BACKENDS = ("auto", "brute", "faiss", "pruned")
#: older names of the backends (``"torch"``: the built-in brute force, whose matmuls now run in numpy's BLAS)
ALIASES = {"torch": "brute"}

#: rows per tile (the unit of selection and of the pruning bound)
TILE = 16
#: rows per chunk (the unit of the pruned search's matmuls: a query computes whole chunks); TILE divides it
CHUNK = 256
#: rows per chunk of the brute force (every chunk is computed: wide chunks make the tile maxima cheap)
BRUTE_CHUNK = 2048
#: the pruned search's query blocks hold this many times the brute force's (its store holds only needed chunks)
PRUNED_BLOCKS = 16
#: chunks per query computed first by the pruned search (those of largest mean similarity), then second (those of
#: largest M_T among the chunks it bounds): their values give its threshold tau (module docstring; no effect on values)
FIRST_CHUNKS = 4
SECOND_CHUNKS = 4
#: margins of the float64 shell bound: on every cosine and angle (ANGLE_MARGIN + (D + 4) 2^-52) and on the bound
#: (module docstring, "Shell bound")
ANGLE_MARGIN = 1e-12
SHELL_SLACK = 1e-9
#: rows per cone of the spherical k-means that orders the bank (k = n // CLUSTER_SIZE cones, at most MAX_CLUSTERS)
CLUSTER_SIZE = 2048
MAX_CLUSTERS = 4096
#: rank of the pruned search's principal basis (the bound's matmul costs RANK / D of the similarities')
RANK = 32
#: spherical k-means iterations (seeded; the order changes speed, never a value)
KMEANS_ITERS = 10
#: absolute margin for the float32 evaluation of the bounds (module docstring)
SLACK = 1e-6
#: "auto" searches by brute force when the median residual norm |b - P P^T b| of the bank exceeds this
#: (no low-rank structure: the bounds would prune nothing; random unit vectors of width 256: 0.94)
PRUNE_RESIDUAL = 0.5
#: "auto" with faiss installed: once a block of queries had the pruned search compute more than this share of its
#: similarities, the call's remaining queries go to faiss's full search. On queries far from a less low-rank bank
#: the pruned search costs more than a full search (measured, 1 thread: mnist-mlp features, 60,000 references,
#: Fashion-MNIST queries: 62 % computed, 6.8-7.9 s against 5.1 s for faiss; the break-even is near 35 %). Values
#: are the same either way: both searches give the m largest float32 similarities the certificate needs.
AUTO_SWITCH_SHARE = 0.35


@contextlib.contextmanager
def blas_threads():
    """numpy's BLAS runs with ``torch.get_num_threads()`` threads inside the block (threadpoolctl), so that
    ``torch.set_num_threads(1)`` / ``OMP_NUM_THREADS=1`` hold for the search as for the rest of uvood."""
    from threadpoolctl import ThreadpoolController

    # a fresh controller each time: it sees every BLAS loaded so far (faiss brings its own)
    with ThreadpoolController().limit(limits=torch.get_num_threads(), user_api="blas"):
        yield


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"pruned"``; ``"torch"`` -> ``"brute"``; an unknown or missing backend is an error."""
    backend = ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise UvoodError(f"KNN search backend {backend!r} is unknown; use one of {list(BACKENDS)}.")
    if backend == "auto":
        return "pruned"
    if backend == "faiss" and not faiss_available():
        raise UvoodError("KNN search backend 'faiss' needs faiss-cpu: pip install 'uvood[faiss]', "
                         "or use backend='pruned' (same values).")
    return backend


def float32_error(d: int) -> float:
    """err = (D + 4) 2^-24 (with 1% margin): the bound on |float32 similarity - exact| of unit vectors."""
    return (d + 4) * 2.0**-24 * 1.01


def tile_max(block: np.ndarray, tpc: int) -> torch.Tensor:
    """rows x tpc: the maxima of the TILE contiguous slices of ``tpc`` values of each row of ``block`` (rows x
    TILE * tpc), by halving with numpy's elementwise maximum (measured 3.5x faster than torch's ``amax`` over
    the strided axis, and 2-3x faster than torch's ``maximum`` on blocks of under 100 rows, which are many:
    less time per call). TILE is a power of two."""
    v = block.reshape(block.shape[0], TILE, tpc)
    while v.shape[1] > 1:
        half = v.shape[1] // 2
        v = np.maximum(v[:, :half], v[:, half:])
    return torch.from_numpy(v[:, 0])


def largest(x: torch.Tensor, m: int, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the m largest entries of each row of a float32 N x w tensor (m <= w), in no order
    (decreasing when ``ordered``), like ``torch.topk`` (any of tied entries): numpy's ``argpartition``, measured
    1.5-2x faster than ``torch.topk`` on CPU for m = 108 of 1,000-3,000 distinct values (but several times
    slower with many ties, e.g. -inf for what was not computed: use ``torch.topk`` there)."""
    w = x.shape[1]
    idx = np.argpartition(x.numpy(), w - m, axis=1)[:, w - m:]
    vals = np.take_along_axis(x.numpy(), idx, 1)
    if ordered:
        o = np.argsort(-vals, axis=1, kind="stable")
        idx, vals = np.take_along_axis(idx, o, 1), np.take_along_axis(vals, o, 1)
    return torch.from_numpy(vals), torch.from_numpy(idx)


def check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise UvoodError(f"KNN: the {what} hold non-finite values (NaN or inf); score finite features.")


class Float32Search:
    """The m largest float32 similarities of unit queries to a fixed bank of unit rows (step 1 of the
    module docstring), with the bank's float32 layout (and faiss index, or pruning bounds) built once
    and reused. ``stats`` (after :meth:`top`): similarities computed, queries searched by brute force, and
    (pruned search) rows whose rank-R bound was computed (``bounded``)."""

    def __init__(self, bank: torch.Tensor, backend: str = "auto"):
        self.bank, self.requested = bank, backend
        self.backend = resolve_backend(backend)
        self._index = None
        self._tiled = None
        self.stats = {}

    def top(self, q: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, rows), both N x m, values float32 sorted in decreasing order. ``q``: float64 (or float32)."""
        check_finite(q, "query features")
        if self._tiled is None and self.backend != "faiss":
            check_finite(self.bank, "reference features")
            basis = principal_basis(self.bank) if self.backend == "pruned" else None
            if basis is not None and self.requested == "auto" and float(basis[2].median()) > PRUNE_RESIDUAL:
                # no low-rank structure to prune with (e.g. random vectors): a brute force, faiss's when installed
                # (measured faster than "brute" on random vectors, docs/field_detectors.md)
                basis, self.backend = None, "faiss" if faiss_available() else "brute"
            if self.backend != "faiss":
                self._tiled = Tiled(self.bank, basis)
        if self.backend == "faiss":
            self.stats = {"similarities": q.shape[0] * self.bank.shape[0], "brute_queries": q.shape[0]}
            return self._top_faiss(q.float(), m)
        if not (self.requested == "auto" and self._tiled.pruned and faiss_available()):
            with blas_threads():
                return self._tiled.top(q, m, self.stats)
        # "auto": the pruned search block by block, and faiss for the rest once a block pruned too little
        nq, step = q.shape[0], self._tiled.block_queries()
        vals, rows = torch.empty(nq, m, dtype=torch.float32), torch.empty(nq, m, dtype=torch.int64)
        total = {"similarities": 0, "brute_queries": 0, "bounded": 0}
        for lo in range(0, nq, step):
            hi = min(nq, lo + step)
            part = {}
            with blas_threads():
                vals[lo:hi], rows[lo:hi] = self._tiled.top(q[lo:hi], m, part)
            for key in total:
                total[key] += part.get(key, 0)
            if hi < nq and part["similarities"] > AUTO_SWITCH_SHARE * (hi - lo) * self.bank.shape[0]:
                vals[hi:], rows[hi:] = self._top_faiss(q[hi:].float(), m)
                total["similarities"] += (nq - hi) * self.bank.shape[0]
                total["brute_queries"] += nq - hi
                total["switched_at"] = hi
                break
        self.stats = total
        return vals, rows

    def _top_faiss(self, q32, m):
        import faiss

        if self._index is None:
            self._index = faiss.IndexFlatIP(self.bank.shape[1])
            self._index.add(self.bank.float().contiguous().numpy())
        faiss.omp_set_num_threads(torch.get_num_threads())
        vals, idx = self._index.search(q32.contiguous().numpy(), m)
        return torch.from_numpy(vals), torch.from_numpy(idx).long()


def spherical_kmeans(x32: np.ndarray, k: int, iters: int = KMEANS_ITERS, seed: int = 0):
    """Seeded spherical k-means of unit float32 rows: (assignment, k unit float32 axes). Assign each row to
    the axis of largest cosine; an axis becomes its rows' normalised mean (an empty cone keeps its axis)."""
    g = torch.Generator().manual_seed(seed)
    u = x32[torch.randperm(x32.shape[0], generator=g)[:k].numpy()].copy()
    step = max(1, KNN_BLOCK // k)
    for it in range(iters + 1):
        assign = np.concatenate([(x32[lo:lo + step] @ u.T).argmax(1) for lo in range(0, x32.shape[0], step)])
        if it == iters:
            return torch.from_numpy(assign).long(), torch.from_numpy(u)
        s = np.zeros_like(u)
        np.add.at(s, assign, x32)
        norm = np.linalg.norm(s, axis=1, keepdims=True)
        u = np.where(norm > 0, s / np.maximum(norm, 1e-30), u).astype(np.float32)


def principal_basis(bank: torch.Tensor):
    """(P, y, rho): the bank's rank-R principal basis (top eigenvectors of bank^T bank, float64, R = RANK
    or D // 4), every row's coordinates y = P^T b and residual norm rho = |b - P y| (module docstring, "Bound")."""
    r = max(1, min(RANK, bank.shape[1] // 4))
    _, vecs = torch.linalg.eigh(bank.T @ bank)
    p = vecs[:, -r:].contiguous()
    y = bank @ p
    return p, y, (bank - y @ p.T).norm(dim=1)


class Tiled:
    """The bank in the search's layout (module docstring, "Layout"), and the two searches on it: the brute
    force (every chunk) and the pruned one (only the chunks whose bound can reach a query's top m)."""

    def __init__(self, bank: torch.Tensor, basis=None):
        n, d = bank.shape
        self.n, self.d, self.pruned = n, d, basis is not None
        pruned = self.pruned
        self.chunk = CHUNK if pruned else BRUTE_CHUNK
        self.tpc = self.chunk // TILE
        bank32 = bank.float()
        if pruned:
            assign, u = spherical_kmeans(bank32.numpy(), max(1, min(n // CLUSTER_SIZE, MAX_CLUSTERS)))
            cos_b = (bank32 * u[assign]).sum(1)
            order = torch.from_numpy(np.lexsort((-cos_b.numpy(), assign.numpy()))).long()
        else:
            order, assign, u = torch.arange(n), None, None
        self.chunks = math.ceil(n / self.chunk)
        npos = self.chunks * self.chunk
        self.tiles = npos // TILE
        self.real_tiles = math.ceil(n / TILE)
        # place s of ``order`` (tile s // TILE, row s % TILE of the tile) -> position in the chunk layout
        place = torch.arange(npos).view(self.chunks, self.tpc, TILE).transpose(1, 2).reshape(-1)
        real = place < n
        self.rows = torch.full((npos,), -1, dtype=torch.int64)
        self.rows[real] = order[place[real]]
        self.b32 = np.zeros((npos, d), dtype=np.float32)
        self.b32[real.numpy()] = bank32[self.rows[real]].numpy()
        pad = torch.nonzero(~real[npos - self.chunk:]).reshape(-1).numpy()
        self.pad = pad if len(pad) else None  # positions of the last chunk that hold no row (masked to -inf)
        self._buf = np.empty(0, dtype=np.float32)
        self._scratch = {}  # name -> float32 buffer reused across blocks (no page faults per block)
        if pruned:
            self._bounds(bank, basis)
            self._shells(bank, assign, u)

    def _bounds(self, bank, basis):
        """The rank-R principal basis P of the bank, the float32 projections y = P^T b of every row, stored in
        the chunk layout of the rows (zero rows for padding), and per tile the largest residual norm rho_T =
        max |b - P y| (module docstring, "Bound")."""
        self.P, y_rows, rho_rows = basis
        self.r = r = self.P.shape[1]
        self.e_p = 2.0 * float((self.P.T @ self.P - torch.eye(r, dtype=torch.float64)).norm()) + 1e-12
        real = self.rows >= 0
        self.y32 = np.zeros((self.rows.numel(), r), dtype=np.float32)
        self.y32[real.numpy()] = y_rows[self.rows[real]].float().numpy()
        rows = self.tile_rows()
        self.rho_t = torch.where(rows >= 0, rho_rows[rows.clamp_min(0)], 0.0).amax(1).float()

    def _shells(self, bank, assign, u):
        """Per segment (the rows of one chunk in one cone; a chunk holds one or a few): its chunk, its cone, the
        interval [phi_lo, phi_hi] of the rows' angles to the cone's axis (widened by the margin a; a zero row
        spans [0, pi]) and the smallest and largest row norm (module docstring, "Shell bound"); and each chunk's
        mean row, whose similarity chooses the chunks the search computes first."""
        self.axes = u.double() / u.double().norm(dim=1, keepdim=True)
        self.means = self.b32.reshape(self.chunks, self.chunk, self.d).mean(1)
        self.margin = a = ANGLE_MARGIN + (self.d + 4) * 2.0**-52
        real = self.rows >= 0
        pos = torch.nonzero(real).reshape(-1)
        b = bank[self.rows[pos]]
        cone = assign[self.rows[pos]]
        norm = b.norm(dim=1)
        cos = (b * self.axes[cone]).sum(1) / norm.clamp_min(1e-300)
        lo = torch.arccos((cos + a).clamp(-1.0, 1.0)) - a
        hi = torch.arccos((cos - a).clamp(-1.0, 1.0)) + a
        lo[norm == 0], hi[norm == 0] = 0.0, math.pi
        key, seg = torch.unique((pos // self.chunk) * self.axes.shape[0] + cone, return_inverse=True)
        self.seg_chunk, self.seg_cone = key // self.axes.shape[0], key % self.axes.shape[0]

        def reduce(values, how):
            out = torch.zeros(key.numel(), dtype=torch.float64)
            return out.scatter_reduce_(0, seg, values, how, include_self=False)

        self.seg_lo, self.seg_hi = reduce(lo, "amin"), reduce(hi, "amax")
        self.seg_nlo, self.seg_nhi = reduce(norm, "amin"), reduce(norm, "amax")

    def block_queries(self) -> int:
        """Queries per block of :meth:`top` (memory bound; no effect on values)."""
        return max(1, KNN_BLOCK // (self.chunks * self.chunk)) * (PRUNED_BLOCKS if self.pruned else 1)

    def top(self, q, m, stats):
        """(values, rows) of the m largest float32 similarities per query; fills ``stats``."""
        nq = q.shape[0]
        q64, q32 = q.double(), q.float().contiguous().numpy()
        vals = torch.empty(nq, m, dtype=torch.float32)
        rows = torch.empty(nq, m, dtype=torch.int64)
        done = brute = bounded = 0
        step = self.block_queries()
        for lo in range(0, nq, step):
            hi = min(nq, lo + step)
            every = torch.ones(hi - lo, self.chunks, dtype=torch.bool)
            if self.real_tiles < m:  # fewer tiles than m: every row, selected by topk over all values
                s = q32[lo:hi] @ self.b32.T
                s[:, (self.rows < 0).numpy()] = -np.inf
                v, pos = torch.topk(torch.from_numpy(s), m, dim=1)
                vals[lo:hi], rows[lo:hi], need = v, self.rows[pos], every
            elif self.pruned:
                need, store, b = self._pruned(q64[lo:hi], q32[lo:hi], m)
                bounded += b
                vals[lo:hi], rows[lo:hi] = self._select(*store, m)
            else:
                need = every
                vals[lo:hi], rows[lo:hi] = self._select(*self._sims(q32[lo:hi], need), m)
            count = need.sum(1)
            done += int(count.sum()) * self.chunk
            brute += int((count == self.chunks).sum())
        stats.update(similarities=min(done, nq * self.n), brute_queries=brute, bounded=bounded)
        return vals, rows

    def _tiles(self, name, nq):
        """An nq x tiles float32 tensor of -inf in a buffer reused across blocks (one per ``name``)."""
        size = nq * self.tiles
        if self._scratch.get(name, np.empty(0)).size < size:
            self._scratch[name] = np.empty(size, dtype=np.float32)
        return torch.from_numpy(self._scratch[name][:size]).view(nq, self.tiles).fill_(-math.inf)

    def _flat(self, pairs):
        """An uninitialised flat store of ``pairs`` rows of ``chunk`` float32 values, in a buffer reused across
        blocks (no page faults per block)."""
        if self._buf.size < pairs * self.chunk:
            self._buf = np.empty(pairs * self.chunk, dtype=np.float32)
        return self._buf[:pairs * self.chunk].reshape(pairs, self.chunk)

    def _sims(self, q32, need, store=None, base=0):
        """float32 similarities of every query to the chunks it needs, one matmul per chunk with the queries
        that need it, written into ``store`` = (tile maxima, -inf where not computed; flat row number of each
        computed (query, chunk), counted from ``base``; the flat rows, one of ``chunk`` values per pair, pairs
        in chunk order), a new one by default (:meth:`_flat`). Returns the store."""
        nq, tpc = q32.shape[0], self.tpc
        chunk, qs = torch.nonzero(need.T, as_tuple=True)
        pairs = qs.numel()
        if store is None:
            store = (torch.full((nq, self.tiles), -math.inf, dtype=torch.float32),
                     torch.zeros(nq, self.chunks, dtype=torch.int64), self._flat(pairs))
        tmax, loc, flat = store
        counts = torch.bincount(chunk, minlength=self.chunks).tolist()
        qn, at = qs.numpy(), 0
        for c, cnt in enumerate(counts):
            if not cnt:
                continue
            out = flat[at:at + cnt]
            every = cnt == nq
            np.matmul(q32 if every else q32[qn[at:at + cnt]], self.b32[c * self.chunk:(c + 1) * self.chunk].T, out=out)
            if c == self.chunks - 1 and self.pad is not None:
                out[:, self.pad] = -np.inf
            tm = tile_max(out, tpc)  # while the block is in the cache
            if every:
                tmax[:, c * tpc:(c + 1) * tpc] = tm
            else:
                tmax[qs[at:at + cnt], c * tpc:(c + 1) * tpc] = tm
            at += cnt
        loc[qs, chunk] = torch.arange(base, base + pairs)
        return store

    def _select(self, tmax, loc, flat, m):
        """The m largest computed values per query: they lie in the m tiles of largest maximum (each such tile
        holds a value >= the m-th largest tile maximum, and every other tile's values are <= it). A tile not
        computed (maximum -inf; possible when fewer than m tiles are) contributes -inf values."""
        nq = tmax.shape[0]
        best, tiles = torch.topk(tmax, m, dim=1, sorted=False)  # many -inf ties: numpy's argpartition is slow there
        chunk, t = tiles // self.tpc, tiles % self.tpc
        pos = (loc.gather(1, chunk) * self.chunk + t)[:, :, None] + self.tpc * torch.arange(TILE)
        vals = torch.from_numpy(flat).view(-1)[pos].masked_fill_((best == -math.inf)[:, :, None], -math.inf)
        v, at = largest(vals.view(nq, -1), m, ordered=True)
        tile, j = tiles.gather(1, at // TILE), at % TILE
        position = (tile // self.tpc) * self.chunk + j * self.tpc + tile % self.tpc
        return v, self.rows[position]

    def tile_rows(self) -> torch.Tensor:
        """tiles x TILE: the bank rows of every tile (-1: no row), from the chunk layout."""
        t = torch.arange(self.tiles)
        pos = ((t // self.tpc) * self.chunk + t % self.tpc)[:, None] + self.tpc * torch.arange(TILE)
        return self.rows[pos]

    def bounds(self, q64, mask=None):
        """(M, g), both N x tiles float32: M_T the tile's largest float32 x^T y, g = |q_R| rho_T + slack, so that
        UB_T = M_T + g >= q^T b for every row b of the tile and LB_T = M_T - g <= q^T b* for the tile's row b*
        of largest x^T y (module docstring, "Bound"). M_T is computed for the chunks of ``mask`` (N x chunks
        bool; every chunk by default), one matmul of width R per chunk with the queries that need it; it is
        -inf elsewhere and on tiles that hold no row."""
        nq = q64.shape[0]
        x = q64 @ self.P
        rq = (q64 - x @ self.P.T).norm(dim=1)
        qn = q64.norm(dim=1)
        x32 = x.float().numpy()
        slack = float32_error(self.r) * qn.clamp_min(1.0) + 2.0**-23 * qn + self.e_p + SLACK
        gap = (rq[:, None].float() * self.rho_t[None, :]).add_(slack[:, None].float())
        if mask is None:  # every chunk, in a new tensor
            mt, mask = torch.full((nq, self.tiles), -math.inf), torch.ones(nq, self.chunks, dtype=torch.bool)
        else:  # the search's: a buffer reused across blocks
            mt = self._tiles("bounds", nq)
        chunk, qs = torch.nonzero(mask.T, as_tuple=True)
        counts = torch.bincount(chunk, minlength=self.chunks).tolist()
        buf = np.empty((max(counts, default=0), self.chunk), dtype=np.float32)
        qn_, at, tpc = qs.numpy(), 0, self.tpc
        for c, cnt in enumerate(counts):
            if not cnt:
                continue
            every = cnt == nq
            ap = np.matmul(x32 if every else x32[qn_[at:at + cnt]], self.y32[c * self.chunk:(c + 1) * self.chunk].T,
                           out=buf[:cnt])
            if c == self.chunks - 1 and self.pad is not None:
                ap[:, self.pad] = -np.inf
            tm = tile_max(ap, tpc)
            if every:
                mt[:, c * tpc:(c + 1) * tpc] = tm
            else:
                mt[qs[at:at + cnt], c * tpc:(c + 1) * tpc] = tm
            at += cnt
        return mt, gap

    def shell_bounds(self, q64):
        """N x chunks float64: UB_C >= q^T b for every row b of chunk C (module docstring, "Shell bound"): per
        segment |q| |b|_max-or-min cos(dist(theta, [phi_lo, phi_hi])) + SHELL_SLACK, theta = the query's angle
        to the segment's cone axis, the largest over the chunk's segments."""
        qn = q64.norm(dim=1)
        cos = (q64 @ self.axes.T) / qn.clamp_min(1e-300)[:, None]
        a = self.margin
        th_lo = torch.arccos((cos + a).clamp(-1.0, 1.0)) - a
        th_hi = torch.arccos((cos - a).clamp(-1.0, 1.0)) + a
        dist = torch.maximum(th_lo[:, self.seg_cone] - self.seg_hi, self.seg_lo - th_hi[:, self.seg_cone]).clamp_min(0)
        c = torch.cos(dist) + a
        ub = qn[:, None] * torch.where(c >= 0, self.seg_nhi, self.seg_nlo) * c + SHELL_SLACK
        out = torch.full((q64.shape[0], self.chunks), -math.inf, dtype=torch.float64)
        return out.scatter_reduce_(1, self.seg_chunk.expand(q64.shape[0], -1), ub, "amax")

    def _pruned(self, q64, q32, m):
        """The pruned search of a block of queries (module docstring, "Pruned search"): (chunks computed, N x
        chunks bool; the store of their similarities, :meth:`_sims`; rows whose rank-R bound was computed)."""
        nq = q64.shape[0]
        at_least = math.ceil(2 * m / self.chunk)  # chunks for 2m values (large k)
        f = min(self.chunks, max(FIRST_CHUNKS, at_least))
        shell = self.shell_bounds(q64)
        # 1. the f chunks of largest mean similarity; tau = the m-th largest float32 value computed (-inf: fewer than m)
        first = torch.topk(torch.from_numpy(q32 @ self.means.T), f, dim=1).indices
        need = torch.zeros(nq, self.chunks, dtype=torch.bool).scatter_(1, first, True)
        tmax = self._tiles("maxima", nq)
        loc = torch.zeros(nq, self.chunks, dtype=torch.int64)
        flat1 = self._sims(q32, need, (tmax, loc, np.empty((nq * f, self.chunk), dtype=np.float32)))[2]
        top = self._top_values(flat1, loc.gather(1, first), None, m)
        tau = top.amin(1, keepdim=True)
        # 2. M_T on the chunks the shells cannot exclude, then the SECOND_CHUNKS of them of largest M_T; tau again
        bounded = (shell > tau.double()) & ~need
        mt, gap = self.bounds(q64, bounded)
        best = mt.view(nq, self.chunks, self.tpc).amax(2)
        values, second = torch.topk(best, min(self.chunks, max(SECOND_CHUNKS, at_least)), dim=1)
        found = values > -math.inf
        need2 = torch.zeros_like(need).scatter_(1, second, found)
        p1, p2 = nq * f, int(need2.sum())
        flat2 = self._sims(q32, need2, (tmax, loc, np.empty((p2, self.chunk), dtype=np.float32)), p1)[2]
        tau = self._top_values(flat2, loc.gather(1, second) - p1, found, m, top).amin(1, keepdim=True)
        need |= need2
        # 3. every other chunk with a tile of UB_T > tau
        more = (mt.add_(gap) > tau).view(nq, self.chunks, self.tpc).any(2) & bounded & ~need
        flat = self._flat(p1 + p2 + int(more.sum()))
        flat[:p1], flat[p1:p1 + p2] = flat1, flat2
        self._sims(q32, more, (tmax, loc, flat[p1 + p2:]), p1 + p2)
        return need | more, (tmax, loc, flat), int(bounded.sum()) * self.chunk

    def _top_values(self, flat, rows, valid, m, before=None):
        """N x m float32: the m largest values (in no order) of the flat rows ``rows`` (N x r; ``valid``: N x r
        bool, or None for all) of each query, together with ``before`` (N x m, or None); -inf where fewer."""
        if not flat.shape[0]:  # no rows computed
            return before if before is not None else torch.full((rows.shape[0], m), -math.inf)
        vals = torch.from_numpy(flat)[rows.clamp_min(0)]
        if valid is not None:
            vals.masked_fill_(~valid[:, :, None], -math.inf)
        vals = vals.view(rows.shape[0], -1)
        if before is not None:
            vals = torch.cat([before, vals], 1)
        if vals.shape[1] < m:
            vals = torch.cat([vals, torch.full((vals.shape[0], m - vals.shape[1]), -math.inf)], 1)
        w = vals.shape[1]
        return torch.from_numpy(np.partition(vals.numpy(), w - m, axis=1)[:, w - m:])


def kth_similarity(q: torch.Tensor, bank: torch.Tensor, k: int, search: Float32Search | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """The exact k-th largest similarity q_i^T b_j over the rows of ``bank`` (module docstring), float64.

    ``q`` (N x D) and ``bank`` (n x D) are float64 with unit rows; ``search`` reuses a bank's
    :class:`Float32Search` (else one is built with ``backend``)."""
    n, d = bank.shape
    search = Float32Search(bank, backend) if search is None else search
    m = min(n, 2 * k + 8)
    err = float32_error(d)
    top, idx = search.top(q, m)
    out = torch.empty(q.shape[0], dtype=torch.float64)
    for lo in range(0, q.shape[0], CERTIFY_ROWS):
        qb, tb, ib = q[lo:lo + CERTIFY_ROWS], top[lo:lo + CERTIFY_ROWS].double(), idx[lo:lo + CERTIFY_ROWS]
        sk = tb[:, k - 1:k]
        above = (tb > sk + 2 * err).sum(1)
        band = ((tb - sk).abs() <= 2 * err).sum(1)
        # the band's candidates (contiguous in the sorted values) in float64, one dot product per candidate
        r, w = torch.nonzero(torch.arange(int(band.max()))[None, :] < band[:, None], as_tuple=True)
        cand = torch.full((qb.shape[0], int(band.max())), -math.inf, dtype=torch.float64)
        cand[r, w] = (qb[r] * bank[ib[r, above[r] + w]]).sum(1)
        kth = cand.sort(dim=1, descending=True).values.gather(1, (k - 1 - above)[:, None]).squeeze(1)
        if m < n:
            bad = torch.nonzero(above + band >= m).reshape(-1)
            if bad.numel():
                kth[bad] = torch.topk(qb[bad] @ bank.T, k, dim=1).values[:, -1]
        out[lo:lo + CERTIFY_ROWS] = kth
    return out
