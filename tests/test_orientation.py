"""Orientation end to end: every registered score that needs no fitting, on real MNIST (ID) vs Fashion-MNIST (OOD)
from the bundled sample, under the zoo's MNIST model, has AUROC > 0.5 ("higher = more in-distribution").

The scores are generated from the registry (every combination of each entry's choices), so a new score or a new
axis is covered without editing this file. Only the scores documented as identically zero are exempt, by name.
"""

import itertools

import pytest

import uvood
from uvood import zoo
from uvood.bench.scoresets import GROUPS
from uvood.data import datasets, transforms
from uvood.errors import UvoodError
from uvood.scores.registry import _format_value, entries

#: a value for each required positional parameter (a new entry with one must be added here)
EXAMPLE_ARGS = {"norm": {"p": 1}}

#: ||E_{Y~p}[grad log p(Y)]|| = 0 for every input (score-function identity, docs/gradient_scores.md): its AUROC
#: measures round-off, so it has no orientation to test
IDENTICALLY_ZERO = {
    "grad(label=predicted)", "grad(label=predicted,bias=true)", "grad(label=predicted,norm=l2sq)",
    "grad(label=predicted,norm=l2sq,bias=true)", "grad(label=predicted,depth=deep)",
    "grad(label=predicted,norm=l2sq,depth=deep)",
}

#: methods published since the paper (uvood.scores.since) whose defined orientation ranks Fashion-MNIST above MNIST
#: on mnist-mlp (measured 2026-11-30; docs/gradient_scores.md, "Gradient methods since the paper"). Their definitions
#: are kept, not flipped; the tests assert AUROC < 0.5 for them, so that a change of their values is noticed.
REVERSED_HERE = {
    "gaia", "gaia(variant=z)", "gaia(variant=z,target=predicted)", "gaia(variant=z,target=uniform)",
    "gaia(target=uniform)", "gaia_v(target=uniform)",
    "lowdim", "lowdim(bias=true)", "lowdim(depth=deep)",
}

#: deep scores (one backward per label and image) on the first images of each sample only
DEEP_N = 64


def registry_scores():
    """Every combination of every entry's choices, built (invalid combinations of axes are skipped)."""
    for e in entries().values():
        missing = [k for k in e.positional if e.params.get(k) is None and k not in EXAMPLE_ARGS.get(e.name, {})]
        assert not missing, f"add an example value for {e.name}'s {missing} to EXAMPLE_ARGS"
        keys = list(e.choices)
        for combo in itertools.product(*(e.choices[k] for k in keys)):
            args = {**EXAMPLE_ARGS.get(e.name, {}), **dict(zip(keys, combo))}
            text = e.name + ("(" + ",".join(f"{k}={_format_value(v)}" for k, v in args.items()) + ")" if args else "")
            try:
                yield uvood.get_score(text)
            except UvoodError:  # an invalid combination of axes (e.g. bias=true with depth=deep)
                continue


def registry_specs() -> list[str]:
    """Canonical specs of every unfitted registry score, plus the paper's products."""
    out = {score.spec for score in registry_scores() if not score.needs_fit}
    out |= {s for _, s, d in GROUPS["table2"] + GROUPS["figure2"] if d == "none"}
    return sorted(out)


@pytest.fixture(scope="module")
def mnist_vs_fashion():
    model = zoo.load("mnist-mlp")
    x_id, x_ood = (transforms.to_model_format(datasets.sample(n).x, channels=1, size=28)
                   for n in ("mnist", "fashionmnist"))
    return model, x_id, x_ood, uvood.extract(model, x_id, progress=False), uvood.extract(model, x_ood, progress=False)


def test_every_unfitted_score_ranks_real_id_above_ood(mnist_vs_fashion):
    model, x_id, x_ood, f_id, f_ood = mnist_vs_fashion
    specs = registry_specs()
    assert IDENTICALLY_ZERO <= set(specs)  # the exemptions name real scores
    assert {"msp", "energy", "gradnorm", "exgrad(depth=deep)", "gradnorm(bias=true)"} <= set(specs)
    below = {}
    for spec in specs:
        if spec in IDENTICALLY_ZERO:
            continue
        if uvood.get_score(spec).needs_model:
            s_id, s_ood = (uvood.score_model(spec, model, x[:DEEP_N]) for x in (x_id, x_ood))
        else:
            s_id, s_ood = (uvood.score_features(spec, f.h, f.logits) for f in (f_id, f_ood))
        auroc = uvood.metrics.auroc(s_id, s_ood)
        if (not auroc > 0.5) != (spec in REVERSED_HERE):
            below[spec] = round(auroc, 3)
    assert not below, f"scores ranking OOD above ID (check their orientation), or REVERSED_HERE ones not: {below}"


def fitted_specs() -> list[str]:
    """Canonical specs of every registered score that must be fitted on ID data, plus two shaping chains."""
    out = {score.spec for score in registry_scores() if score.needs_fit}
    return sorted(out | {"react(90)>mahalanobis", "react(90)>norm(1)*energy"})


def test_every_fitted_score_ranks_real_id_above_ood(mnist_vs_fashion, data_dir):
    """The fitted scores (BatchGrad, the field's feature-statistics and shaping methods), fitted on 2,000 real MNIST
    training images, rank the bundled MNIST test sample above the Fashion-MNIST one."""
    import torch

    model, x_id, x_ood, f_id, f_ood = mnist_vs_fashion
    train = datasets.load("mnist", "train", data_dir=data_dir, limit=2000)
    x_train, y_train = transforms.to_model_format(train.x, channels=1, size=28), torch.as_tensor(train.y)
    specs = fitted_specs()
    assert {"batchgrad", "mahalanobis", "knn", "vim", "react", "react(90)>mahalanobis"} <= set(specs)
    below = {}
    for spec in specs:
        score = uvood.get_score(spec)
        score.fit(model, x_train, y_train, seed=0)
        if score.needs_model:
            s_id, s_ood = (uvood.score_model(score, model, x[:DEEP_N], progress=False) for x in (x_id, x_ood))
        else:
            s_id, s_ood = (uvood.score_features(score, f.h, f.logits) for f in (f_id, f_ood))
        auroc = uvood.metrics.auroc(s_id, s_ood)
        if (not auroc > 0.5) != (spec in REVERSED_HERE):
            below[spec] = round(auroc, 3)
    assert not below, f"fitted scores ranking OOD above ID (check their orientation), or REVERSED_HERE ones not: " \
        f"{below}"
    assert REVERSED_HERE <= set(specs) | set(registry_specs())  # the exemptions name real scores
