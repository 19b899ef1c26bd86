"""The exact pruned KNN search (``backend="pruned"``, :class:`uvood.scores.neighbours.Partition`): its k-th
similarity equals the float64 brute force on every kind of bank (clustered, random, ties, k near n, far
queries, one cone, tiny banks), equals the torch and faiss searches, its cone bound holds row by row, and on
clustered data it computes fewer similarities than a brute force (counted, not timed)."""

from __future__ import annotations

import math

import pytest
import torch

from uvood.errors import UvoodError
from uvood.scores import neighbours
from uvood.scores.neighbours import Float32Search, Partition, float32_error, kth_similarity

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


@pytest.mark.parametrize("cluster_size", [40, 256])
@pytest.mark.parametrize("case", ["clustered", "random", "ties", "far", "one_cone", "tiny"])
def test_pruned_kth_similarity_equals_float64_brute_force(case, cluster_size, monkeypatch):
    monkeypatch.setattr(neighbours, "CLUSTER_SIZE", cluster_size)
    bank, q = _case(case)
    n = bank.shape[0]
    search = Float32Search(bank, "pruned")
    pruned = []
    for k in sorted({1, 7, 50, n // 2, n - 3, n} & set(range(1, n + 1))):
        ref = torch.topk(q @ bank.T, k, dim=1).values[:, -1]
        torch.testing.assert_close(kth_similarity(q, bank, k, search), ref, rtol=1e-13, atol=1e-15)
        pruned.append(search.stats["brute_queries"] < q.shape[0])
    if case in ("clustered", "ties", "far"):  # the pruned path itself was checked, not only its fallback
        assert all(pruned[:2])


@pytest.mark.parametrize("case", ["clustered", "random", "ties", "far"])
def test_pruned_torch_and_faiss_give_the_same_values(case, monkeypatch):
    """The three candidate searches give the same certified values, and the same float32 top m up to
    float32 rounding (err of the module docstring, step 1)."""
    monkeypatch.setattr(neighbours, "CLUSTER_SIZE", 32)
    bank, q = _case(case)
    m = 2 * 20 + 8
    out, top = {}, {}
    for backend in ("torch", "faiss", "pruned"):
        search = Float32Search(bank, backend)
        top[backend] = search.top(q.float(), m)[0].double()
        out[backend] = kth_similarity(q, bank, 20, search)
    for backend in ("faiss", "pruned"):
        torch.testing.assert_close(out[backend], out["torch"], rtol=1e-13, atol=1e-15)
        assert float((top[backend] - top["torch"]).abs().max()) <= 2 * float32_error(bank.shape[1])


def test_cone_bound_holds_for_every_row(monkeypatch):
    """UB(q, unit) >= q^T b for every query and every row b of the unit (float64), including queries on a
    cone's axis, at its antipode, random ones, bank rows, zero rows in the bank (norm < 1), and queries where
    the bound is attained: the unit's widest row b rotated by 0.3 rad further from the axis (q^T b = cos 0.3 =
    UB up to the slack), so that any bound smaller than the spherical cap bound fails here."""
    monkeypatch.setattr(neighbours, "CLUSTER_SIZE", 40)
    bank, mu = _clustered(2000, spread=0.3)
    bank = torch.cat([bank, torch.zeros(5, D, dtype=torch.float64)])
    part = Partition(bank, bank.float())
    g = torch.Generator().manual_seed(1)
    axes = _unit(part.u32.double())
    widest = bank[part.order][torch.tensor([hi - 1 for _, hi in part.bounds])]
    axis = axes[part.cone]
    cos_w = (widest * axis).sum(1, keepdim=True)
    ok = (cos_w.squeeze(1) < 0.999) & (widest.norm(dim=1) > 0.5)  # a defined plane (axis, widest unit row)
    perp = _unit(widest - cos_w * axis)
    theta = torch.arccos(cos_w.clamp(-1, 1)) + 0.3
    tight = (torch.cos(theta) * axis + torch.sin(theta) * perp)[ok]
    q = torch.cat([axes, -axes, _unit(torch.randn(200, D, generator=g, dtype=torch.float64)), bank[:200], tight])
    ub = part.upper_bounds(q.float(), float32_error(D)).double()
    sims = q @ bank[part.order].T
    for u, (lo, hi) in enumerate(part.bounds):
        worst = sims[:, lo:hi].amax(1)
        assert bool((worst <= ub[:, u]).all()), f"unit {u}: bound below a similarity"
    units = torch.nonzero(ok).reshape(-1)
    at = ub[-len(units):].gather(1, units[:, None]).squeeze(1)
    torch.testing.assert_close(at, torch.full_like(at, math.cos(0.3)), rtol=0, atol=1e-4)


def test_pruned_search_skips_most_of_a_clustered_bank(monkeypatch):
    """On a clustered bank with queries near the clusters, the pruned search computes a fraction of the
    N x n similarities of a brute force and sends no query to the brute force; on random vectors (no
    structure to prune) it falls back to the brute force and computes at most 1.5 x its similarities."""
    monkeypatch.setattr(neighbours, "CLUSTER_SIZE", 64)
    g = torch.Generator().manual_seed(2)
    bank, mu = _clustered(20000, centres=40, spread=0.1, d=64)
    q = _unit(mu[torch.arange(500) % 40] + 0.1 * torch.randn(500, 64, generator=g, dtype=torch.float64))
    search = Float32Search(bank, "pruned")
    ref = torch.topk(q @ bank.T, 50, dim=1).values[:, -1]
    torch.testing.assert_close(kth_similarity(q, bank, 50, search), ref, rtol=1e-13, atol=1e-15)
    assert search.stats["brute_queries"] == 0
    assert search.stats["similarities"] < 0.25 * 500 * 20000
    bank, q = _unit(torch.randn(20000, 64, generator=g, dtype=torch.float64)), _unit(torch.randn(500, 64, generator=g))
    search = Float32Search(bank, "pruned")
    kth_similarity(q.double(), bank, 50, search)
    assert search.stats["brute_queries"] > 400
    assert search.stats["similarities"] <= 1.5 * 500 * 20000


def test_pruned_sends_non_finite_and_non_unit_queries_to_the_brute_force(monkeypatch):
    """A NaN query fails as it does with faiss (the brute force it is sent to); a query of norm 0.5 (the
    bound assumes unit queries) is searched by brute force and gets the brute force's value."""
    monkeypatch.setattr(neighbours, "CLUSTER_SIZE", 64)
    bank, mu = _clustered(3000)
    q = torch.cat([_unit(mu), 0.5 * _unit(mu[:3])])
    search = Float32Search(bank, "pruned")
    ref = torch.topk(q @ bank.T, 5, dim=1).values[:, -1]
    torch.testing.assert_close(kth_similarity(q, bank, 5, search), ref, rtol=1e-13, atol=1e-15)
    assert search.stats["brute_queries"] == 3
    q[0] = float("nan")
    with pytest.raises(UvoodError, match="faiss found fewer neighbours"):
        kth_similarity(q, bank, 5, Float32Search(bank, "pruned"))
