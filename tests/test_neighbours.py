"""The KNN searches of :mod:`uvood.scores.neighbours` (brute force and exact pruned search, float32 matmuls in
numpy's BLAS): their k-th similarity equals the float64 brute force on every kind of bank (clustered, random,
ties, k near n, far queries, one cone, banks smaller than a block or than m tiles), the backends agree, the
principal-basis tile bound holds row by row, the pruned search computes fewer similarities than a brute force
on clustered data (counted, not timed), the chunks' shell bounds hold row by row, and numpy's BLAS runs with
torch's thread count."""

from __future__ import annotations

import math

import pytest
import torch

from uvood.scores import neighbours
from uvood.scores.neighbours import Float32Search, Tiled, float32_error, kth_similarity, principal_basis

D = 32


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _clustered(n, centres=12, spread=0.15, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centres, d, generator=g, dtype=torch.float64)
    return _unit(mu[torch.arange(n) % centres] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)), mu


def _case(name):
    """(bank, queries): unit float64 rows."""
    g = torch.Generator().manual_seed(7)
    if name == "clustered":
        bank, mu = _clustered(3000)
        q = _unit(mu[torch.arange(400) % 12] + 0.2 * torch.randn(400, D, generator=g, dtype=torch.float64))
    elif name == "random":
        bank, q = _unit(torch.randn(3000, D, generator=g, dtype=torch.float64)), None
        q = _unit(torch.randn(300, D, generator=g, dtype=torch.float64))
    elif name == "ties":  # exact duplicate rows and near-duplicates: ties inside the certificate's band
        base, mu = _clustered(500)
        bank = torch.cat([base, base, base[:200] + 1e-12, base[:100]])
        bank = _unit(bank)
        q = _unit(torch.cat([base[:150], mu + 0.1 * torch.randn(12, D, generator=g, dtype=torch.float64)]))
    elif name == "far":  # queries opposite to every cluster, and orthogonal to every row (all similarities 0)
        bank, _ = _clustered(3000)
        pad = torch.zeros(3000, 4, dtype=torch.float64)
        bank = torch.cat([bank.abs(), pad], 1)
        q = torch.zeros(200, D + 4, dtype=torch.float64)
        q[:100, :D] = -torch.rand(100, D, generator=g, dtype=torch.float64)
        q[100:, D:] = torch.randn(100, 4, generator=g, dtype=torch.float64)
        q = _unit(q)
    elif name == "one_cone":
        bank, _ = _clustered(200, centres=1, spread=0.05)
        q = _unit(bank[:50] + 0.3 * torch.randn(50, D, generator=g, dtype=torch.float64))
    elif name == "tiny":  # n smaller than a cone, a shell, and m
        bank, _ = _clustered(30, centres=3)
        q = _unit(torch.randn(40, D, generator=g, dtype=torch.float64))
    return bank, q


#: small layouts, so that the test banks span many chunks, bound blocks and query blocks (no effect on values)
SMALL = {"CHUNK": 32, "CLUSTER_SIZE": 64, "KNN_BLOCK": 4096}


def _layout(monkeypatch, small):
    for name, value in (SMALL if small else {}).items():
        monkeypatch.setattr(neighbours, name, value)


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("backend", ["pruned", "brute"])
@pytest.mark.parametrize("case", ["clustered", "random", "ties", "far", "one_cone", "tiny"])
def test_kth_similarity_equals_float64_brute_force(case, backend, small, monkeypatch):
    _layout(monkeypatch, small)
    bank, q = _case(case)
    n = bank.shape[0]
    search = Float32Search(bank, backend)
    pruned = []
    for k in sorted({1, 7, 50, n // 2, n - 3, n} & set(range(1, n + 1))):
        ref = torch.topk(q @ bank.T, k, dim=1).values[:, -1]
        torch.testing.assert_close(kth_similarity(q, bank, k, search), ref, rtol=1e-13, atol=1e-15)
        pruned.append(search.stats["brute_queries"] < q.shape[0])
    if backend == "pruned" and small and case in ("clustered", "ties", "far"):  # the pruning itself was checked
        assert all(pruned[:2])


@pytest.mark.parametrize("case", ["clustered", "random", "ties", "far"])
def test_backends_give_the_same_values(case, monkeypatch):
    """The candidate searches give the same certified values, and the same float32 top m up to float32
    rounding (err of the module docstring, step 1); every candidate row's similarity is its value."""
    _layout(monkeypatch, True)
    bank, q = _case(case)
    m = 2 * 20 + 8
    out, top = {}, {}
    for backend in ("brute", "faiss", "pruned", "auto"):
        search = Float32Search(bank, backend)
        vals, rows = search.top(q, m)
        top[backend] = vals.double()
        torch.testing.assert_close(top[backend], (q[:, None, :] * bank[rows]).sum(-1), rtol=0,
                                   atol=float32_error(bank.shape[1]))
        assert bool((rows.sort(dim=1).values.diff(dim=1) > 0).all())  # m distinct rows
        out[backend] = kth_similarity(q, bank, 20, search)
    for backend in ("faiss", "pruned", "auto"):
        torch.testing.assert_close(out[backend], out["brute"], rtol=1e-13, atol=1e-15)
        assert float((top[backend] - top["brute"]).abs().max()) <= 2 * float32_error(bank.shape[1])


def test_tile_bound_holds_for_every_row(monkeypatch):
    """UB_T >= q^T b for every query and every row b of tile T (float64), and LB_T <= the largest q^T b of the
    tile, for queries on the bank, random ones, opposite ones, one of norm 0.5, and a bank with zero rows; and
    the bound is tight where the rows lie in the principal subspace (a bank of rank R: the gap is the slack)."""
    _layout(monkeypatch, True)
    g = torch.Generator().manual_seed(1)
    bank, _ = _clustered(2000, spread=0.3)
    bank = torch.cat([bank, torch.zeros(5, D, dtype=torch.float64)])
    q = torch.cat([bank[:100], -bank[100:150], _unit(torch.randn(100, D, generator=g, dtype=torch.float64)),
                   0.5 * bank[150:160]])
    for b in (bank, _unit(torch.randn(900, 3, generator=g, dtype=torch.float64) @ torch.randn(3, D, generator=g,
                                                                                             dtype=torch.float64))):
        tiled = Tiled(b, principal_basis(b))
        mt, gap = tiled.bounds(q)
        rows = tiled.tile_rows()
        sims = torch.cat([q @ b.T, torch.full((q.shape[0], 1), -math.inf, dtype=torch.float64)], 1)[:, rows]
        best = sims.amax(2)  # tiles x rows -> the largest exact similarity of each tile
        real = rows[:, 0] >= 0
        assert bool(((mt + gap).double()[:, real] >= best[:, real]).all()), "UB_T below a similarity"
        assert bool(((mt - gap).double()[:, real] <= best[:, real]).all()), "LB_T above the tile's best row"
        assert bool((mt[:, ~real] == -math.inf).all())
    assert float(gap.max()) < 1e-4  # rank 3 < R: no residual, only the slack


def test_shell_bound_holds_for_every_row(monkeypatch):
    """The float64 shell bound of every chunk is >= q^T b for every row b of the chunk (float64), for queries on
    the bank, opposite ones, random ones, of norm 0.5 and 3, the zero query, and a bank with zero rows; and it
    is tight for a query equal to a bank row on that row's chunk (its angle lies in the row's shell), so that a
    bound 1 % too small fails the first assertion."""
    _layout(monkeypatch, True)
    g = torch.Generator().manual_seed(3)
    bank, _ = _clustered(2000, spread=0.3)
    bank = torch.cat([bank, torch.zeros(5, D, dtype=torch.float64)])
    q = torch.cat([bank[:100], -bank[100:150], _unit(torch.randn(100, D, generator=g, dtype=torch.float64)),
                   0.5 * bank[150:160], 3.0 * bank[160:170], torch.zeros(1, D, dtype=torch.float64)])
    tiled = Tiled(bank, principal_basis(bank))
    ub = tiled.shell_bounds(q)
    rows = tiled.rows.view(tiled.chunks, tiled.chunk)
    sims = torch.cat([q @ bank.T, torch.full((q.shape[0], 1), -math.inf, dtype=torch.float64)], 1)[:, rows]
    best = sims.amax(2)  # queries x chunks: the largest exact similarity of each chunk
    assert bool((ub >= best).all()), "shell bound below a similarity"
    own = (ub - best)[:100].gather(1, torch.nonzero(rows[None, :, :] == torch.arange(100)[:, None, None])[:, 1:2])
    assert float(own.abs().max()) < 1e-6
    # the shells exclude chunks: a query on the bank is far from most cones
    assert float((ub[:100] < 0.5).double().mean()) > 0.3


def test_pruned_search_skips_most_of_a_clustered_bank(monkeypatch):
    """On a clustered bank whose centres span few dimensions (as penultimate features do), with queries near
    the clusters, the pruned search computes a fraction of the N x n similarities of a brute force (and of its
    rank-R bounds) and sends no query to the brute force; on random vectors "auto" takes a brute force (no
    low-rank structure), and "pruned" computes at most every similarity."""
    monkeypatch.setattr(neighbours, "CLUSTER_SIZE", 512)
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 64, generator=g, dtype=torch.float64)
    mu = 10 * _unit(mu)
    bank = _unit(mu[torch.arange(20000) % 40] + 0.3 * torch.randn(20000, 64, generator=g, dtype=torch.float64))
    q = _unit(mu[torch.arange(500) % 40] + 0.3 * torch.randn(500, 64, generator=g, dtype=torch.float64))
    search = Float32Search(bank, "auto")
    ref = torch.topk(q @ bank.T, 50, dim=1).values[:, -1]
    torch.testing.assert_close(kth_similarity(q, bank, 50, search), ref, rtol=1e-13, atol=1e-15)
    assert search.backend == "pruned"
    assert search.stats["brute_queries"] == 0
    assert search.stats["similarities"] < 0.35 * 500 * 20000
    assert search.stats["bounded"] < 0.35 * 500 * 20000  # the shells spare the rank-R bound most chunks
    # a large k (m = 1,208 values: more than the 4 chunks computed first hold) is still pruned, and exact
    ref = torch.topk(q @ bank.T, 600, dim=1).values[:, -1]
    torch.testing.assert_close(kth_similarity(q, bank, 600, search), ref, rtol=1e-13, atol=1e-15)
    assert search.stats["bounded"] < 0.5 * 500 * 20000
    assert search.stats["similarities"] < 0.5 * 500 * 20000
    bank, q = _unit(torch.randn(20000, 64, generator=g, dtype=torch.float64)), _unit(torch.randn(500, 64, generator=g))
    for backend in ("auto", "pruned"):
        search = Float32Search(bank, backend)
        ref = torch.topk(q.double() @ bank.T, 50, dim=1).values[:, -1]
        torch.testing.assert_close(kth_similarity(q.double(), bank, 50, search), ref, rtol=1e-13, atol=1e-15)
        brute = "faiss" if neighbours.faiss_available() else "brute"
        assert search.backend == {"auto": brute, "pruned": "pruned"}[backend]
        assert search.stats["similarities"] <= 500 * 20000


def test_non_unit_queries_get_the_brute_force_value(monkeypatch):
    """The bound does not assume unit queries: queries of norm 0.5 and 3 get the float64 brute force's value."""
    _layout(monkeypatch, True)
    bank, mu = _clustered(3000)
    q = torch.cat([_unit(mu), 0.5 * _unit(mu[:3]), 3.0 * _unit(mu[3:6])])
    ref = torch.topk(q @ bank.T, 5, dim=1).values[:, -1]
    torch.testing.assert_close(kth_similarity(q, bank, 5, Float32Search(bank, "pruned")), ref, rtol=1e-13,
                               atol=1e-15)


def test_blas_runs_with_torchs_thread_count():
    """Inside the search, numpy's BLAS (the float32 matmuls) runs with torch.get_num_threads() threads (one
    under ``OMP_NUM_THREADS=1`` / ``torch.set_num_threads(1)``), and its own setting is restored afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=2, user_api="blas"):
            outside = blas()
            with neighbours.blas_threads():
                inside = blas()
            assert blas() == outside
    finally:
        torch.set_num_threads(before)
    assert inside and all(t == 1 for t in inside)


@pytest.mark.parametrize("share", [0.0, 2.0])
def test_auto_hands_the_rest_of_a_call_to_faiss_after_a_block_that_pruned_too_little(share, monkeypatch):
    """"auto" (faiss installed) searches block by block with the pruned search; after a block that computed more
    than AUTO_SWITCH_SHARE of its similarities, the rest of the call goes to faiss. Share 0: every first block
    switches; share 2: never. Either way the values are the float64 brute force's."""
    pytest.importorskip("faiss")
    _layout(monkeypatch, True)
    monkeypatch.setattr(neighbours, "AUTO_SWITCH_SHARE", share)
    bank, q = _case("clustered")
    search = Float32Search(bank, "auto")
    step = None
    for k in (1, 7, 50):
        ref = torch.topk(q @ bank.T, k, dim=1).values[:, -1]
        torch.testing.assert_close(kth_similarity(q, bank, k, search), ref, rtol=1e-13, atol=1e-15)
        step = search._tiled.block_queries()
        assert step < q.shape[0]  # several blocks, so that there is a rest to hand over
        if share == 0.0:
            assert search.stats["switched_at"] == step and search.stats["brute_queries"] >= q.shape[0] - step
        else:
            assert "switched_at" not in search.stats and search.stats["brute_queries"] < q.shape[0]
