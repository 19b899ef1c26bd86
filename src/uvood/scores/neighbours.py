"""The k-th largest similarity of each query to a bank of unit vectors, for KNN (Sun et al., ICML 2022):
exact in float64, searched in float32.

DOCSTRING-PLACEHOLDER
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
#: entries per block of the pruned search's bound matrix (queries x rows; sized for the cache)
BOUND_BLOCK = 2**21
#: rows per cone of the spherical k-means that orders the bank (k = n // CLUSTER_SIZE cones, at most MAX_CLUSTERS)
CLUSTER_SIZE = 2048
MAX_CLUSTERS = 4096
#: rank of the pruned search's principal basis (the bound's matmul costs RANK / D of the similarities')
RANK = 48
#: spherical k-means iterations (seeded; the order changes speed, never a value)
KMEANS_ITERS = 10
#: absolute margin for the float32 evaluation of the bounds (module docstring)
SLACK = 1e-6

_blas = None


@contextlib.contextmanager
def blas_threads():
    """numpy's BLAS runs with ``torch.get_num_threads()`` threads inside the block (threadpoolctl), so that
    ``torch.set_num_threads(1)`` / ``OMP_NUM_THREADS=1`` hold for the search as for the rest of uvood."""
    global _blas
    from threadpoolctl import ThreadpoolController

    if _blas is None:
        _blas = ThreadpoolController()
    with _blas.limit(limits=torch.get_num_threads(), user_api="blas"):
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


def check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise UvoodError(f"KNN: the {what} hold non-finite values (NaN or inf); score finite features.")


class Float32Search:
    """The m largest float32 similarities of unit queries to a fixed bank of unit rows (step 1 of the
    module docstring), with the bank's float32 layout (and faiss index, or pruning bounds) built once
    and reused. ``stats`` (after :meth:`top`): similarities computed, queries searched by brute force."""

    def __init__(self, bank: torch.Tensor, backend: str = "auto"):
        self.bank, self.requested = bank, backend
        self.backend = resolve_backend(backend)
        self._index = None
        self._tiled = None
        self.stats = {}

    def top(self, q: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, rows), both N x m, values float32 sorted in decreasing order. ``q``: float64 (or float32)."""
        check_finite(q, "query features")
        if self.backend == "faiss":
            self.stats = {"similarities": q.shape[0] * self.bank.shape[0], "brute_queries": q.shape[0]}
            return self._top_faiss(q.float(), m)
        if self._tiled is None:
            check_finite(self.bank, "reference features")
            self._tiled = Tiled(self.bank, pruned=self.backend == "pruned")
        with blas_threads():
            return self._tiled.top(q, m, self.stats)

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


class Tiled:
    """The bank in the search's layout (module docstring, "Layout"), and the two searches on it: the brute
    force (every chunk) and the pruned one (only the chunks whose bound can reach a query's top m)."""

    def __init__(self, bank: torch.Tensor, pruned: bool):
        n, d = bank.shape
        self.n, self.d, self.pruned = n, d, pruned
        self.tpc = CHUNK // TILE
        bank32 = bank.float()
        if pruned:
            assign, u = spherical_kmeans(bank32.numpy(), max(1, min(n // CLUSTER_SIZE, MAX_CLUSTERS)))
            cos_b = (bank32 * u[assign]).sum(1)
            order = torch.from_numpy(np.lexsort((-cos_b.numpy(), assign.numpy()))).long()
        else:
            order = torch.arange(n)
        self.chunks = math.ceil(n / CHUNK)
        npos = self.chunks * CHUNK
        self.tiles = npos // TILE
        self.real_tiles = math.ceil(n / TILE)
        # place s of ``order`` (tile s // TILE, row s % TILE of the tile) -> position in the chunk layout
        place = torch.arange(npos).view(self.chunks, self.tpc, TILE).transpose(1, 2).reshape(-1)
        real = place < n
        self.rows = torch.full((npos,), -1, dtype=torch.int64)
        self.rows[real] = order[place[real]]
        self.b32 = np.zeros((npos, d), dtype=np.float32)
        self.b32[real.numpy()] = bank32[self.rows[real]].numpy()
        pad = torch.nonzero(~real[npos - CHUNK:]).reshape(-1).numpy()
        self.pad = pad if len(pad) else None  # positions of the last chunk that hold no row (masked to -inf)
        self._buf = np.empty(0, dtype=np.float32)
        if pruned:
            self._bounds(bank, order)

    def _bounds(self, bank, order):
        """The rank-R principal basis P of the bank, the float32 projections y = P^T b of every row in the
        tile-major layout (row j of tile t at j * tiles + t), and per tile the largest residual norm
        rho_T = max |b - P y| (module docstring, "Bound")."""
        n, npos = self.n, self.tiles * TILE
        r = max(1, min(RANK, self.d // 4))
        _, vecs = torch.linalg.eigh(bank.T @ bank)
        self.P, self.r = vecs[:, -r:].contiguous(), r
        self.e_p = 2.0 * float((self.P.T @ self.P - torch.eye(r, dtype=torch.float64)).norm()) + 1e-12
        y = torch.zeros(npos, r, dtype=torch.float64)
        rho = torch.zeros(npos, dtype=torch.float64)
        y[:n] = bank[order] @ self.P
        rho[:n] = (bank[order] - y[:n] @ self.P.T).norm(dim=1)
        self.y32 = y.view(self.tiles, TILE, r).transpose(0, 1).reshape(npos, r).float().contiguous().numpy()
        self.rho_t = rho.view(self.tiles, TILE).amax(1).float()
        place = torch.arange(npos).view(self.tiles, TILE).T.reshape(-1)
        ypad = torch.nonzero(place >= n).reshape(-1).numpy()
        self.ypad = ypad if len(ypad) else None

    def top(self, q, m, stats):
        """(values, rows) of the m largest float32 similarities per query; fills ``stats``."""
        nq = q.shape[0]
        q64, q32 = q.double(), q.float().contiguous().numpy()
        vals = torch.empty(nq, m, dtype=torch.float32)
        rows = torch.empty(nq, m, dtype=torch.int64)
        done = brute = 0
        step = max(1, KNN_BLOCK // (self.chunks * CHUNK)) * (4 if self.pruned else 1)
        for lo in range(0, nq, step):
            hi = min(nq, lo + step)
            every = torch.ones(hi - lo, self.chunks, dtype=torch.bool)
            if self.real_tiles < m:  # fewer tiles than m: every chunk, selected by topk over all values
                s = self._sims(q32[lo:hi], every)[2]
                v, pos = torch.topk(torch.from_numpy(s).view(hi - lo, -1), m, dim=1)
                vals[lo:hi], rows[lo:hi], need = v, self.rows[pos], every
            else:
                need = self._need(q64[lo:hi], m) if self.pruned else every
                vals[lo:hi], rows[lo:hi] = self._select(q32[lo:hi], need, m)
            count = need.sum(1)
            done += int(count.sum()) * CHUNK
            brute += int((count == self.chunks).sum())
        stats.update(similarities=min(done, nq * self.n), brute_queries=brute)
        return vals, rows

    def _sims(self, q32, need):
        """float32 similarities of every query to the chunks it needs: (tile maxima, -inf where not computed;
        location of each (query, chunk) in the flat store; flat store, one row of CHUNK values per pair)."""
        nq = q32.shape[0]
        tmax = torch.full((nq, self.tiles), -math.inf, dtype=torch.float32)
        loc = torch.zeros(nq, self.chunks, dtype=torch.int64)
        size = int(need.sum()) * CHUNK
        if self._buf.size < size:
            self._buf = np.empty(size, dtype=np.float32)
        flat = self._buf[:size].reshape(-1, CHUNK)
        at = 0
        counts = need.sum(0).tolist()
        for c, cnt in enumerate(counts):
            if not cnt:
                continue
            out = flat[at:at + cnt]
            if cnt == nq:
                np.matmul(q32, self.b32[c * CHUNK:(c + 1) * CHUNK].T, out=out)
                qs = slice(None)
            else:
                qs = torch.nonzero(need[:, c]).reshape(-1)
                np.matmul(q32[qs.numpy()], self.b32[c * CHUNK:(c + 1) * CHUNK].T, out=out)
            if c == self.chunks - 1 and self.pad is not None:
                out[:, self.pad] = -np.inf
            tmax[qs, c * self.tpc:(c + 1) * self.tpc] = torch.from_numpy(out).view(cnt, TILE, self.tpc).amax(1)
            loc[qs, c] = torch.arange(at, at + cnt)
            at += cnt
        return tmax, loc, flat

    def _select(self, q32, need, m):
        """The m largest computed values per query: they lie in the m tiles of largest maximum (each such tile
        holds a value >= the m-th largest tile maximum, and every other tile's values are <= it)."""
        nq = q32.shape[0]
        tmax, loc, flat = self._sims(q32, need)
        tiles = torch.topk(tmax, m, dim=1, sorted=False).indices
        chunk, t = tiles // self.tpc, tiles % self.tpc
        pos = (loc.gather(1, chunk) * CHUNK + t)[:, :, None] + self.tpc * torch.arange(TILE)
        v, at = torch.topk(torch.from_numpy(flat).view(-1)[pos.view(nq, -1)], m, dim=1)
        tile, j = tiles.gather(1, at // TILE), at % TILE
        position = (tile // self.tpc) * CHUNK + j * self.tpc + tile % self.tpc
        return v, self.rows[position]

    def _need(self, q64, m):
        """Chunks each query must compute (N x chunks, bool), from the tile bounds of the module docstring:
        UB_T = M_T + g, LB_T = M_T - g (M_T the tile's largest float32 x^T y, g = |q_R| rho_T + slack);
        tau = the m-th largest LB_T <= the exact m-th similarity; a chunk is needed if a tile has UB_T > tau."""
        nq = q64.shape[0]
        x = q64 @ self.P
        rq = (q64 - x @ self.P.T).norm(dim=1)
        qn = q64.norm(dim=1)
        x32 = x.float().numpy()
        slack = float32_error(self.r) * qn.clamp_min(1.0) + 2.0**-23 * qn + self.e_p + SLACK
        gap = (rq[:, None].float() * self.rho_t[None, :]).add_(slack[:, None].float())
        mt = torch.empty(nq, self.tiles, dtype=torch.float32)
        step = max(1, BOUND_BLOCK // self.y32.shape[0])
        for lo in range(0, nq, step):
            ap = x32[lo:lo + step] @ self.y32.T
            if self.ypad is not None:
                ap[:, self.ypad] = -np.inf
            mt[lo:lo + step] = torch.from_numpy(ap).view(-1, TILE, self.tiles).amax(1)
        tau = torch.topk(mt - gap, m, dim=1, sorted=False).values.amin(1, keepdim=True)
        need = mt.add_(gap) > tau
        return need.view(nq, self.chunks, self.tpc).any(2)


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
