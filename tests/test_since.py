"""Gradient methods since the paper (uvood.scores.since): every fast path and closed form against the
per-sample float64 autograd references of uvood.scores.reference, on random models (an MLP, a CNN with
BatchNorm in eval mode and max-pooling, C in {3, 10, 17}); and the bad-input errors."""

import numpy as np
import pytest
import torch
from torch import nn

from uvood.errors import UvoodError
from uvood.scores.reference import reference_fisher, reference_gaia, reference_gradorth, reference_lowdim
from uvood.scores.registry import get_score

CLASSES = (3, 10, 17)


def make_mlp(C):
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 9), nn.ReLU(), nn.Linear(9, C)).double().eval()


class CNN(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 7, 3), nn.ReLU(inplace=True))
        self.fc = nn.Linear(7, C)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def make_cnn(C):
    m = CNN(C)
    bn = m.features[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.3, 0.3)
    return m.double().eval()


MODELS = {"mlp": (make_mlp, (12,)), "cnn": (make_cnn, (3, 10, 10))}


def _data(kind, C, n=7, n_id=60):
    make, shape = MODELS[kind]
    model = make(C)
    return model, torch.randn(n, *shape, dtype=torch.float64) * 2, torch.randn(n_id, *shape, dtype=torch.float64)


def _close(a, b, rel=1e-6):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rel, atol=rel * np.abs(b).max())


@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("variant", ["a", "z"])
@pytest.mark.parametrize("target", ["authors", "predicted", "uniform"])
def test_gaia_one_backward_matches_per_sample_reference_on_cnn(C, variant, target):
    model, x, _ = _data("cnn", C)
    fast = get_score(f"gaia(variant={variant},target={target})").from_model(model, x)
    ref = reference_gaia(model, x, variant=variant, target=target)
    _close(fast, ref)
    if variant == "z":  # ReLU and max-pool leave exact zeros: the share is a fraction strictly inside (0, 1)
        assert (ref < 0).all()
    one = get_score(f"gaia(variant={variant},layer=features.4,target={target})").from_model(model, x)
    _close(one, reference_gaia(model, x, variant=variant, layer="features.4", target=target))
    assert not torch.allclose(one, fast)


@pytest.mark.parametrize("C", CLASSES)
def test_gaia_defaults_are_the_authors_batch_procedure(C):
    """The defaults against the authors' procedure written out on a batch (github.com/JGEthanChen/GAIA-OOD,
    cal_method.py, hook.py): tensor hooks store the gradient at every BatchNorm output; GAIA-Z backpropagates the
    sum of the max logits, averages the indicator grad != 0 over positions, concatenates the channels of all
    layers, squares and averages them, and negates; GAIA-A backpropagates sum_k log softmax(z)_k to the last map F
    before the pool (o = sqrt(mean_c |mean_t dL/dF_c|)), then the sum of the pooled features to the BatchNorm
    outputs, and averages (|mean_t grad| / o)^2 over the channels. uvood takes o at the pooled h instead:
    dL/dF = dL/dh / |positions|, so the authors' value is |positions| times uvood's (the same ranking)."""
    model, x, _ = _data("cnn", C)
    stored = {}

    def hook(name):
        def fwd(module, inputs, output):
            output.register_hook(lambda g: stored.__setitem__(name, g.detach()))
        return fwd

    handles = [model.features[1].register_forward_hook(hook("bn")), model.features.register_forward_hook(hook("F"))]
    pooled = []
    handles.append(model.fc.register_forward_hook(lambda m, i, o: pooled.append(i[0])))
    y = model(x)
    y.max(dim=1).values.sum().backward(retain_graph=True)
    zero = -((stored["bn"] != 0).double().mean(dim=(-1, -2)) ** 2).mean(1)
    torch.log_softmax(y, dim=-1).sum().backward(retain_graph=True)
    o = stored["F"].mean(dim=(-1, -2)).abs().mean(1).sqrt()[:, None]
    pooled[0].sum().backward()
    avg = -((stored["bn"].mean(dim=(-1, -2)).abs() / o) ** 2).mean(1)
    for hd in handles:
        hd.remove()
    _close(get_score("gaia(variant=z)").from_model(model, x), zero)
    positions = stored["F"][0, 0].numel()
    _close(positions * get_score("gaia").from_model(model, x), avg)
    assert get_score("gaia").spec == get_score("gaia(variant=a,layer=auto,target=authors,T=1)").spec


@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("variant", ["a", "z"])
def test_gaia_on_an_mlp_uses_the_hidden_linear_outputs(C, variant):
    model, x, _ = _data("mlp", C)
    for target in ("authors", "predicted"):
        _close(get_score(f"gaia(variant={variant},target={target})").from_model(model, x),
               reference_gaia(model, x, variant=variant, target=target))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("C", CLASSES)
def test_gaia_at_the_head_is_its_closed_form_output_term(kind, C):
    """GAIA-A of the head's input h: -1 / mean_d |W^T dL/dz| (authors) or -mean_d (W^T dL/dz)_d^2, a pure V term
    (gaia_v, from features)."""
    model, x, x_id = _data(kind, C)
    for target in ("authors", "predicted", "uniform"):
        ref = reference_gaia(model, x, layer="head", T=2.0, target=target)
        _close(get_score(f"gaia(layer=head,T=2,target={target})").from_model(model, x), ref)
        v = get_score(f"gaia_v(T=2,target={target})")
        v.fit(model, x_id, None)
        _close(v.from_model(model, x), ref)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("C", CLASSES)
def test_gradorth_closed_form_and_uv_product_match_autograd(kind, C):
    model, x, x_id = _data(kind, C)
    from uvood.features import extract

    h_id = extract(model, x_id, progress=False).h
    ref = reference_gradorth(model, x, h_id, 3, T=1.5)
    for spec in ("gradorth(k=3,T=1.5)", "gradorth_u(k=3)*gradorth_v(T=1.5)"):
        s = get_score(spec)
        s.fit(model, x_id, None)
        _close(s.from_model(model, x), ref)


def test_gradorth_energy_rule_picks_the_smallest_rank_holding_the_share():
    model, x, x_id = _data("mlp", 10, n_id=200)
    from uvood.features import extract

    h = extract(model, x_id, progress=False).h.double()
    s = np.linalg.svd(h.numpy(), compute_uv=False)
    share = np.cumsum(s**2) / (s**2).sum()
    for energy in (0.5, 0.9, 0.99):
        score = get_score(f"gradorth(energy={energy})")
        score.fit(model, x_id, None)
        k = int(np.argmax(share >= energy)) + 1
        assert score.basis.shape[1] == k
        _close(score.from_model(model, x), reference_gradorth(model, x, h, k))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("bias", [False, True])
def test_lowdim_projection_without_full_gradients_matches_materialised_svd(kind, C, bias):
    model, x, x_id = _data(kind, C)
    k = 4
    s = get_score(f"lowdim({k},bias={str(bias).lower()})")
    s.fit(model, x_id, None)
    _close(s.from_model(model, x), reference_lowdim(model, x_id, x, k, bias=bias), rel=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("C", CLASSES)
def test_deep_lowdim_by_jvp_and_vjp_matches_materialised_per_sample_gradients(kind, C):
    """With k + oversample >= the number of fit samples the randomized SVD spans the ID gradients exactly, so the
    score equals the reference's (per-sample backward over every parameter, numpy SVD)."""
    model, x, x_id = _data(kind, C, n_id=12)
    s = get_score("lowdim(4,depth=deep)")
    s.fit(model, x_id, None)
    _close(s.from_model(model, x), reference_lowdim(model, x_id, x, 4, depth="deep"), rel=1e-6)
    state = s.state()
    again = get_score("lowdim(4,depth=deep)")
    again.load_state(state)
    _close(again.from_model(model, x), s.from_model(model, x), rel=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("C", CLASSES)
def test_fisher_trace_shallow_deep_and_uv_form_match_autograd(kind, C):
    model, x, _ = _data(kind, C)
    ref_shallow = reference_fisher(model, x, T=1.3)
    _close(get_score("fisher(T=1.3)").from_model(model, x), ref_shallow)
    _close(get_score("sqnorm*fisher_v(T=1.3)").from_model(model, x), ref_shallow)
    _close(get_score("fisher(bias=true)").from_model(model, x), reference_fisher(model, x, bias=True))
    _close(get_score("fisher(depth=deep)").from_model(model, x), reference_fisher(model, x, depth="deep"))


def test_bad_inputs_are_named():
    mlp, x, x_id = _data("mlp", 3)
    cnn, xc, _ = _data("cnn", 3)
    with pytest.raises(UvoodError, match="no convolution and no hidden linear layer"):
        get_score("gaia").from_model(nn.Linear(12, 3).double(), x)
    with pytest.raises(UvoodError, match="has no layer named 'nope'"):
        get_score("gaia(layer=nope)").from_model(cnn, xc)
    with pytest.raises(UvoodError, match="not a spatial feature map"):
        get_score("gaia(layer=fc)").from_model(cnn, xc)
    with pytest.raises(UvoodError, match="variant='b' is not valid; choose one of a, z"):
        get_score("gaia(variant=b)")
    with pytest.raises(UvoodError, match="the temperature T must be a finite number > 0"):
        get_score("gaia(T=0)")
    with pytest.raises(UvoodError, match="projection rank k = 12 is larger than the fitted data allows.*rank 9"):
        get_score("gradorth(k=12)").fit(mlp, x_id, None)
    with pytest.raises(UvoodError, match="projection rank k = 20 is larger than the fitted data allows.*span 5"):
        get_score("lowdim(20)").fit(mlp, x_id[:5], None)
    with pytest.raises(UvoodError, match="projection rank k = 20 is larger than the fitted data allows.*span 5"):
        get_score("lowdim(20,depth=deep)").fit(mlp, x_id[:5], None)
    with pytest.raises(UvoodError, match="biases included: drop bias=true"):
        get_score("lowdim(depth=deep,bias=true)")
    with pytest.raises(UvoodError, match="fitted on a model with .* parameters, but this one has"):
        s = get_score("lowdim(2,depth=deep)")
        s.fit(mlp, x_id[:8], None)
        s.from_model(make_mlp(4), x)
    for spec in ("gradorth", "gradorth_u*gradorth_v", "lowdim", "gaia_v", "lowdim(depth=deep)"):
        with pytest.raises(UvoodError, match="must be fitted on ID training data first"):
            get_score(spec).from_model(mlp, x)
    with pytest.raises(UvoodError, match="needs an integer rank k >= 1"):
        get_score("lowdim(0)")
    with pytest.raises(UvoodError, match="energy\\) must be a share in \\(0, 1\\]"):
        get_score("gradorth(energy=1.5)")


def test_since_section_from_a_mini_run(tmp_path, data_dir):
    """The group runs end to end on real data; the table's cells are the run's AUROCs (checked with
    scikit-learn on the run's scores), and each sentence follows from the rows: GradOrth's and the shallow
    Fisher trace's U·V forms are the same numbers, so they match on every pair."""
    from sklearn.metrics import roc_auc_score

    from test_bench import _mini_spec
    from uvood.bench.runner import run
    from uvood.bench.scoresets import with_depth
    from uvood.bench.since import SINCE, section

    spec = _mini_spec(tmp_path, quick_deep_n=12)
    specs = [with_depth(s, d) for _, s, d in SINCE if not (s == "fisher" and d == "deep")]
    result = run(spec, scores=specs, quick=True, data_dir=data_dir, cache_dir=tmp_path / "c", progress=False,
                 log=lambda *a: 0, n_boot=50)
    lines = section(result)
    text = "\n".join(lines)
    assert lines[0] == "## Gradients since the paper"
    table = [ln for ln in lines if ln.startswith("| ") and "`" in ln]
    assert len(table) == len(specs)
    row = next(r for r in result.rows if r["score"] == "gradorth" and r["ood"] == "CIFAR-10")
    s_id, s_ood = result.scores[("MNIST", "MNIST", "gradorth")], result.scores[("MNIST", "CIFAR-10", "gradorth")]
    auc = roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])
    assert f"{auc:.3f} [" in next(ln for ln in table if ln.startswith("| GradOrth (shallow)"))
    assert abs(row["auroc"] - auc) < 1e-12
    assert "**GradOrth** (`gradorth` vs `gradorth_u*gradorth_v`): yes: the U·V form matches the full method " \
           "within its CI on every pair (2 of 2 pairs inside" in text
    assert "**Fisher trace** (`fisher` vs `sqnorm*fisher_v`): yes" in text
    assert "**Low-dimensional gradients** (`lowdim(depth=deep)`): no U·V form" in text  # the deep row, preferred
    assert "**GAIA-A** (`gaia` vs `gaia_v`):" in text


class _Mixed(nn.Module):
    """Every projection rule at once: a grouped convolution with reflect padding, an affine BatchNorm, a late
    convolution with few positions (the stacked path), a linear layer on a 3-D input (positions), a module
    without a rule (torch.func), and (tied=True) a weight also read outside its own forward (uncovered)."""

    def __init__(self, C, tied=False):
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 5, 3, stride=2)
        self.seq = nn.Linear(5, 7)
        self.scale = _Scale(7)
        self.sq = nn.Linear(7, 7)
        self.fc = nn.Linear(7, C)
        self.tied = tied

    def forward(self, x):
        t = self.c2(torch.relu(self.bn(self.c1(x))))  # n x 5 x 2 x 2
        t = torch.tanh(self.seq(t.flatten(2).transpose(1, 2)))  # n x 4 positions x 7
        h = self.scale(t.mean(1))
        u = self.sq(h)
        if self.tied:  # sq.weight read again outside sq's own forward: not covered by its records
            u = u + 0.5 * nn.functional.linear(torch.tanh(h), self.sq.weight)
        return self.fc(torch.relu(u))


class _Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.w


def _mixed(C, tied=False):
    torch.manual_seed(C)
    m = _Mixed(C, tied)
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    m.bn.weight.data.uniform_(0.5, 1.5)
    m.bn.bias.data.uniform_(-0.3, 0.3)
    return m.double().eval()


def _per_sample_projection(model, x, v):
    """J(x) V the textbook way: per sample, backward of logsumexp(z) over every parameter, flattened, @ V."""
    from uvood.scores.reference import _head_grads

    g, _ = _head_grads(model, x, lambda z: torch.logsumexp(z, dim=1)[0], "fc", torch.float64, False, True)
    return g @ v


@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("factor", [0.0, 1e9])
def test_projection_from_records_matches_per_sample_gradients(C, tied, factor, monkeypatch):
    """phi = J(x) V from one forward and backward agrees with per-sample backward passes on every rule: a grouped
    reflect-padded conv, BatchNorm, a 3-D linear input, a module without a rule, a tied weight (the jvp
    fallback for sq.weight), with the convolutions' projection forced both ways by the cost model's factor."""
    from uvood.scores import since

    monkeypatch.setattr(since, "CONV_KERNEL_FACTOR", factor)
    model = _mixed(C, tied)
    x = torch.randn(9, 4, 6, 6, dtype=torch.float64)
    named = [(n, p) for n, p in model.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(sum(p.numel() for _, p in named), 5, dtype=torch.float64, generator=gen)
    _close(since.project_gradients(model, x, v, model.fc, named, batch_size=4), _per_sample_projection(model, x, v))


@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("factor", [0.0, 1e9])
def test_backprojection_from_records_matches_per_sample_gradients(C, tied, factor, monkeypatch):
    """J^T W (the fit's other product) from one forward and backward equals sum_n w_nj (per-sample gradient of
    sample n), per-sample backward passes, on every rule, the tied weight by autograd backward, with the
    convolutions' stacked kernel and their materialised per-sample gradients (forced by the cost model's factor)."""
    from uvood.scores import since
    from uvood.scores.reference import _head_grads

    monkeypatch.setattr(since, "CONV_KERNEL_FACTOR", factor)

    model = _mixed(C, tied)
    x = torch.randn(9, 4, 6, 6, dtype=torch.float64)
    named = list(model.named_parameters())
    w = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g, _ = _head_grads(model, x, lambda z: torch.logsumexp(z, dim=1)[0], "fc", torch.float64, False, True)
    _close(since.backproject_gradients(model, x, w, model.fc, named, batch_size=4), g.T @ w)


def test_projection_uses_the_jvp_only_for_uncovered_parameters(monkeypatch):
    """On a model the records cover, no jvp is run; with a tied weight only that weight goes to the jvp."""
    from uvood.scores import since

    seen = []
    real = since._jvp_projection
    monkeypatch.setattr(since, "_jvp_projection", lambda m, x, named, *a: seen.append([n for n, _ in named])
                        or real(m, x, named, *a))
    for tied in (False, True):
        model = _mixed(10, tied)
        named = list(model.named_parameters())
        v = torch.randn(sum(p.numel() for _, p in named), 3, dtype=torch.float64)
        since.project_gradients(model, torch.randn(5, 4, 6, 6, dtype=torch.float64), v, model.fc, named)
    assert seen == [["sq.weight"]]


def test_conv_cost_model_stacks_only_layers_with_few_positions():
    from uvood.scores.since import CONV_KERNEL_FACTOR, conv_stacked_cheaper

    conv = nn.Conv2d(3, 4, 3)
    assert conv_stacked_cheaper(conv, torch.zeros(1, 4, 2, 2), 10)
    assert not conv_stacked_cheaper(conv, torch.zeros(1, 4, 16, 16), 10)
    assert CONV_KERNEL_FACTOR > 0


class _Residual(nn.Module):
    """A ResNet-style block: the BatchNorm output is changed in place (``out += identity``) and an in-place ReLU
    follows, so that a kept map must be copied where (and only where) the model changes it after its module."""

    def __init__(self, C):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, C)

    def forward(self, x):
        identity = torch.relu(self.bn1(self.c1(x)))
        out = self.bn2(self.c2(identity))
        out += identity
        return self.fc(self.relu(out).mean(dim=(2, 3)))


@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("variant", ["a", "z"])
def test_gaia_keeps_maps_changed_in_place_over_several_micro_batches(C, variant, monkeypatch):
    """GAIA keeps the chosen maps without copying them unless the model changes one in place after its module
    (here bn2's output, by ``out += identity``): with a memory budget of one sample (7 micro-batches) the values
    still equal the per-sample reference, which copies every map."""
    from uvood.scores import since

    torch.manual_seed(C)
    model = _Residual(C)
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model = model.double().eval()
    x = torch.randn(7, 3, 6, 6, dtype=torch.float64)
    monkeypatch.setattr(since, "GAIA_MEMORY", 1)
    assert since.gaia_micro_batch(model, x, model.fc, since.GAIA_BATCH_SIZE) == 1
    _close(get_score(f"gaia(variant={variant})").from_model(model, x), reference_gaia(model, x, variant=variant))


class _Convs(nn.Module):
    """Ungrouped convolutions with reflect padding, dilation and stride (the unfolded stacked projection)."""

    def __init__(self, C):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 5, 3, stride=2)
        self.fc = nn.Linear(5, C)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.relu(self.c1(x)))).mean(dim=(2, 3)))


@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("factor", [0.0, 1e9])
def test_conv_projections_match_per_sample_gradients_with_padding_modes(C, factor, monkeypatch):
    """J(x) V on ungrouped convolutions (reflect padding with dilation, a strided one): the unfolded patches times
    the stacked filters (factor 1e9) and the per-sample kernel through the reused buffer (factor 0, a buffer of 3
    samples for 8), against per-sample backward passes."""
    from uvood.scores import since

    monkeypatch.setattr(since, "CONV_KERNEL_FACTOR", factor)
    monkeypatch.setattr(since, "PROJECT_BUFFER_ELEMENTS", 3 * 4 * 3 * 9)
    torch.manual_seed(C)
    model = _Convs(C).double().eval()
    x = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    named = list(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(sum(p.numel() for _, p in named), 6, dtype=torch.float64, generator=gen)
    _close(since.project_gradients(model, x, v, model.fc, named, batch_size=8), _per_sample_projection(model, x, v))


class _Stop(Exception):
    pass


def test_deep_lowdim_draws_its_start_on_the_models_device(monkeypatch):
    """The randomized SVD's start matrix (drawn on the CPU, seeded, so the same on any device) reaches J^T W on the
    model's device (a meta model: no data, only devices)."""
    from uvood.scores.since import LowDimDeepScore

    seen = []

    def record(self, model, x, w, head):
        seen.append(w.device)
        raise _Stop

    monkeypatch.setattr(LowDimDeepScore, "_jt", record)
    model = make_mlp(3).to("meta")
    with pytest.raises(_Stop):
        get_score("lowdim(depth=deep)").fit(model, torch.empty(20, 12, dtype=torch.float64, device="meta"), None,
                                            head=model[4])
    assert seen == [torch.device("meta")]


def test_backprojection_of_uncovered_parameters_follows_the_models_device(monkeypatch):
    """J^T W for a tied weight (one autograd backward per column) takes W's column on the model's device: on a
    meta model the backward runs and only copying its (data-less) result out fails."""
    from uvood.scores import since

    monkeypatch.setattr(since, "vjp_record", lambda *a: {})
    model = _mixed(3, tied=True).to("meta")
    x = torch.empty(5, 4, 6, 6, dtype=torch.float64, device="meta")
    with pytest.raises(NotImplementedError, match="meta tensor"):
        since.backproject_gradients(model, x, torch.randn(5, 3, dtype=torch.float64), model.fc,
                                    list(model.named_parameters()), 4)
