"""The ImageNet claims table (bench/claims.py) on synthetic scores whose answers are known by
construction: each verdict can come out holds, fails or not resolved."""

import numpy as np

from uvood import metrics
from uvood.bench import claims
from uvood.bench.runner import RunResult
from uvood.bench.spec import BenchSpec
from uvood.data.datasets import subset_indices

OODS = ("Textures", "MNIST", "Fashion-MNIST")
N = 300


def gauss(seed, shift, n=N):
    return np.random.default_rng(seed).normal(shift, 1.0, n)


def make_result(per_model: dict) -> RunResult:
    """per_model: {id_name: {score: (id_scores, {ood: ood_scores})}} -> a RunResult with rows and scores."""
    pairs = [(i, o) for i in per_model for o in OODS]
    spec = BenchSpec(name="synthetic", version=1, description="", datasets={n: {} for n in [*per_model, *OODS]},
                     models={i: f"model-{i}" for i in per_model}, pairs=pairs, cross_domain="imagenet", n=N,
                     quick_n=N, metric={"tpr": 0.95, "fpr_positive": "id"}, groups=["claims"], deep=True)
    scores, rows = {}, []
    for id_name, table in per_model.items():
        for score, (s_id, by_ood) in table.items():
            scores[(id_name, id_name, score)] = s_id
            for ood, s_ood in by_ood.items():
                scores[(id_name, ood, score)] = s_ood
                rows.append({"id": id_name, "ood": ood, "score": score, "auroc": metrics.auroc(s_id, s_ood)})
    return RunResult(spec, rows, scores, {}, {})


def score(seed, ood_shift):
    """ID ~ N(0, 1); OOD set k ~ N(-shift_k, 1): a larger shift separates better."""
    shifts = ood_shift if isinstance(ood_shift, dict) else dict.fromkeys(OODS, ood_shift)
    return gauss(seed, 0.0), {o: gauss(seed + 1 + k, -shifts[o]) for k, o in enumerate(OODS)}


def test_claim_a_holds_fails_or_is_not_resolved():
    table = {"msp": score(0, 0.3), "norm(1)*msp": score(10, 1.5),  # much better with ||h||_1
             "energy": score(20, 1.5), "norm(1)*energy": score(30, 0.3),  # much worse
             "varsum": score(40, 0.8)}
    table["norm(1)*varsum"] = (2 * table["varsum"][0] + 1, {o: 2 * s + 1 for o, s in table["varsum"][1].items()})
    out = {r["v"]: r for r in claims.evaluate(make_result({"M": table}), n_boot=200)["M"]["a"]}
    assert out["msp"]["verdict"] == "holds" and out["msp"]["ci_low"] > 0 and out["msp"]["sets_better"] == 3
    assert out["energy"]["verdict"] == "fails" and out["energy"]["ci_high"] < 0
    # the same ranking: paired resamples give a zero-width interval at 0
    assert out["varsum"]["verdict"] == "not resolved" and out["varsum"]["ci_low"] == out["varsum"]["ci_high"] == 0
    assert "tv" not in out  # no TV rows, no claim


def test_claim_b_compares_gradnorm_with_h1_tv_on_the_same_subset():
    htv = score(0, 0.8)
    k = 40
    keep_id, keep = subset_indices(N, k), subset_indices(N, k)
    table = {"norm(1)*tv": htv,
             # shallow: a monotone transform of ||h||_1 TV (the paper's identity up to a constant): agree
             "gradnorm": (3 * htv[0], {o: 3 * s for o, s in htv[1].items()}),
             # deep, on an evenly spaced subset of k images per set, equal to ||h||_1 TV there: agree only if
             # ||h||_1 TV is restricted to the same images
             "gradnorm(depth=deep)": (htv[0][keep_id] ** 3, {o: s[keep] ** 3 for o, s in htv[1].items()})}
    b = {r["depth"]: r for r in claims.evaluate(make_result({"M": table}), n_boot=200)["M"]["b"]}
    assert b["shallow"]["verdict"] == "holds" and b["shallow"]["delta"] == 0 and b["shallow"]["n_id"] == N
    assert b["deep"]["verdict"] == "holds" and b["deep"]["delta"] == 0 and b["deep"]["n_id"] == k
    table["gradnorm"] = score(5, 0.0)  # carries no information: differs from ||h||_1 TV
    b = {r["depth"]: r for r in claims.evaluate(make_result({"M": table}), n_boot=200)["M"]["b"]}
    assert b["shallow"]["verdict"] == "fails" and b["shallow"]["ci_high"] < 0


def test_claim_c_ranks_the_papers_cell_with_an_interval():
    good = {"norm(0.3)*energy": score(0, 1.2), "norm(1)*energy": score(10, 0.4), "norm(2)*tv": score(20, 0.2)}
    c = claims.evaluate(make_result({"M": good}), n_boot=200)["M"]["c"]
    assert c["rank"] == 1 and c["of"] == 3 and c["best"] == "norm(0.3)*energy" and c["verdict"] == "holds"
    bad = {**good, "norm(0.3)*energy": score(0, 0.2), "norm(1)*energy": score(10, 1.5)}
    c = claims.evaluate(make_result({"M": bad}), n_boot=200)["M"]["c"]
    assert c["best"] == "norm(1)*energy" and c["rank"] >= 2 and c["ci_low"] > 0 and c["verdict"] == "fails"
    assert c["rank_ci"][0] >= 2


def test_claim_d_and_e_selection_against_the_oracle_for_two_models():
    # model A: one cell is best on every OOD set -> the selection is the oracle
    a = {"norm(0.3)*energy": score(0, 1.2), "norm(1)*msp": score(10, 0.4)}
    # model B: norm(1)*msp is best on Textures and MNIST but useless on Fashion-MNIST, where
    # norm(0.3)*energy is far better -> selecting on the other two sets misses the oracle on every set
    b = {"norm(1)*msp": score(20, {"Textures": 1.5, "MNIST": 1.5, "Fashion-MNIST": 0.0}),
         "norm(0.3)*energy": score(30, {"Textures": 0.5, "MNIST": 0.5, "Fashion-MNIST": 1.5})}
    out = claims.evaluate(make_result({"A": a, "B": b}), n_boot=200)
    assert all(r["verdict"] == "holds" and r["selected"] == r["oracle"] for r in out["A"]["d"])
    miss = {r["ood"]: r for r in out["B"]["d"]}["Fashion-MNIST"]
    assert miss["selected"] == "norm(1)*msp" and miss["oracle"] == "norm(0.3)*energy"
    assert miss["ci_low"] > 0 and miss["verdict"] == "fails"
    assert all(r["selected_on"].count("A→") == 0 for r in out["B"]["d"])  # selected within model B's pairs only
    rows = {r["claim"][:3]: r for r in claims.summary(out)}
    assert rows["(d)"]["verdicts"] == {"A": "holds", "B": "fails"} and rows["(d)"]["all_models"] == "no"
    md = claims.markdown(out)
    assert "do not hold" in md and "(d) leave-one-OOD-set-out selection matches the oracle (B)" in md


def test_verdict_rules():
    assert claims.verdict(0.01, 0.2) == "holds" and claims.verdict(-0.2, -0.01) == "fails"
    assert claims.verdict(-0.01, 0.02) == "not resolved"
    assert claims.verdict(-0.01, 0.02, "agree") == "holds" and claims.verdict(0.01, 0.02, "agree") == "fails"
    assert claims._overall([]) == "no data"
    assert claims._overall([{"verdict": "holds"}, {"verdict": "fails"}]) == "partly"


def test_claims_json_is_reused_only_for_the_same_inputs(tmp_path, monkeypatch):
    table = {"msp": score(0, 0.3), "norm(1)*msp": score(10, 1.5), "norm(0.3)*energy": score(20, 1.0)}
    result = make_result({"M": table})
    first = claims.evaluate_cached(result, tmp_path / "claims.json", n_boot=100)
    calls = []
    monkeypatch.setattr(claims, "evaluate", lambda *a, **k: calls.append(1) or {})
    assert claims.evaluate_cached(result, tmp_path / "claims.json", n_boot=100) == first and calls == []
    result.scores[("M", "MNIST", "msp")] = result.scores[("M", "MNIST", "msp")] + 1e-9  # other numbers: recomputed
    assert claims.evaluate_cached(result, tmp_path / "claims.json", n_boot=100) == {} and calls == [1]
