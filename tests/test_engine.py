"""The deep engine's per-layer rules and bookkeeping, each against per-sample autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uvood.errors import UvoodError
from uvood.scores import engine
from uvood.scores.engine import FALLBACK, LayerRule, per_sample_grad_norms, register_rule, rule_for
from uvood.scores.gradient import grad_shallow


def autograd_per_sample(module, inputs, g):
    """{name: K x n x shape}: gradient of <g[k, i], module(inputs[i])> w.r.t. each own parameter."""
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    params = [getattr(module, n) for n in names]
    K, n = g.shape[:2]
    out = {name: torch.zeros(K, n, *p.shape, dtype=p.dtype) for name, p in zip(names, params)}
    for i in range(n):
        y = module(*[t[i:i + 1] for t in inputs])
        for k in range(K):
            grads = torch.autograd.grad((y * g[k, i:i + 1]).sum(), params, retain_graph=True, allow_unused=True)
            for name, gr in zip(names, grads):
                if gr is not None:
                    out[name][k, i] = gr
    return out


LAYERS = [
    ("linear2d", lambda: nn.Linear(6, 4), lambda: (torch.randn(5, 6),)),
    ("linear3d", lambda: nn.Linear(6, 4), lambda: (torch.randn(5, 3, 6),)),
    ("linear_nobias", lambda: nn.Linear(6, 4, bias=False), lambda: (torch.randn(5, 6),)),
    ("conv1d", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), lambda: (torch.randn(5, 3, 9),)),
    ("conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: (torch.randn(5, 3, 6, 6),)),
    ("conv2d_groups", lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2),
     lambda: (torch.randn(5, 4, 9, 9),)),
    ("conv2d_reflect", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
     lambda: (torch.randn(5, 2, 5, 5),)),
    ("conv2d_same", lambda: nn.Conv2d(2, 3, 4, padding="same", bias=False), lambda: (torch.randn(5, 2, 6, 6),)),
    ("conv2d_circular", lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 1), padding_mode="circular"),
     lambda: (torch.randn(5, 2, 6, 5),)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2), lambda: (torch.randn(4, 2, 3, 3, 3),)),
    ("bn1d", lambda: nn.BatchNorm1d(6), lambda: (torch.randn(5, 6),)),
    ("bn2d", lambda: nn.BatchNorm2d(3), lambda: (torch.randn(5, 3, 4, 4),)),
    ("layernorm_fallback", lambda: nn.LayerNorm(6), lambda: (torch.randn(5, 6),)),
    ("groupnorm_fallback", lambda: nn.GroupNorm(2, 4), lambda: (torch.randn(5, 4, 3, 3),)),
    ("embedding_fallback", lambda: nn.Embedding(10, 4), lambda: (torch.randint(0, 10, (5, 3)),)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name,make_module,make_inputs", LAYERS, ids=[row[0] for row in LAYERS])
def test_rule_matches_autograd(name, make_module, make_inputs):
    torch.manual_seed(1)
    module = make_module().double().eval()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    inputs = tuple(t.double() if t.is_floating_point() else t for t in make_inputs())
    with torch.no_grad():
        y = module(*inputs)
    K = 3
    g = torch.randn(K, *y.shape, dtype=torch.float64)
    expected = autograd_per_sample(module, inputs, g)
    rule = rule_for(module)
    assert (rule is FALLBACK) == name.endswith("fallback")
    names = list(expected)
    got = rule.grad_sample(module, inputs, {}, g, names)
    for key in names:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12)
    for norm in ("l1", "l2sq"):
        fast = rule.norms(module, inputs, {}, g, names, norm)
        for key, value in fast.items():
            torch.testing.assert_close(value, engine.reduce_norm(expected[key], norm), rtol=1e-10, atol=1e-12)


def naive_norms(model, x, cot, norm, params=None, offsets=None):
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    offsets = offsets or {}
    rows = []
    for i in range(x.shape[0]):
        z = model(x[i:i + 1])
        v = cot(z.detach().double()).to(z.dtype)
        row = []
        for k in range(v.shape[0]):
            grads = torch.autograd.grad((z * v[k]).sum(), params, retain_graph=True, allow_unused=True)
            total = 0.0
            for p, gr in zip(params, grads):
                gr = torch.zeros_like(p) if gr is None else gr
                gr = gr + offsets.get(id(p), 0)
                total += float(gr.abs().sum() if norm == "l1" else (gr * gr).sum())
            row.append(total)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).T


def label_cot(z):
    p = torch.softmax(z, 1)
    return torch.eye(z.shape[1], dtype=torch.float64)[:, None, :] - p[None]


class Twice(nn.Module):
    """A module called twice and a weight tied between two layers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 4)
        self.c = nn.Linear(4, 5, bias=False)
        self.c.weight = nn.Parameter(self.b.weight.detach().T.clone())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.a(x))))
        return self.head(torch.tanh(self.c(torch.tanh(self.b(h)))))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 16, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y.relu_()  # modifies the recorded BN output in place
        return self.head(y.flatten(1))


class RootParam(nn.Module):
    """A parameter owned by the root module and used in its own forward (torch.func fallback)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(x * self.scale))


@pytest.mark.parametrize("model_cls,shape", [(Twice, (6, 5)), (InPlace, (6, 2, 4, 4)), (RootParam, (6, 5))])
@pytest.mark.parametrize("norm", ["l1", "l2sq"])
def test_engine_matches_naive_on_tricky_models(model_cls, shape, norm):
    torch.manual_seed(2)
    model = model_cls().double().eval()
    if model_cls is InPlace:
        model.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(*shape, dtype=torch.float64)
    got, logits = per_sample_grad_norms(model, x, label_cot, norm=norm, batch_size=4)
    torch.testing.assert_close(got, naive_norms(model, x, label_cot, norm), rtol=1e-10, atol=0)
    torch.testing.assert_close(logits, model(x).detach())


def test_offsets_and_param_subset():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).double().eval()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    offsets = {id(p): torch.randn_like(p) for p in list(model.parameters())[::2]}
    got, _ = per_sample_grad_norms(model, x, label_cot, norm="l1", offsets=offsets)
    torch.testing.assert_close(got, naive_norms(model, x, label_cot, "l1", offsets=offsets), rtol=1e-10, atol=0)
    # the head's weight alone is the shallow closed form's rank-one gradient
    head = model[3]
    for norm in ("l1", "l2sq"):
        got, z = per_sample_grad_norms(model, x, label_cot, norm=norm, params=[head.weight])
        with torch.no_grad():
            h = model[2](model[1](model[0](x)))
        p = torch.softmax(z, 1)
        torch.testing.assert_close((p.T * got).sum(0), grad_shallow(h, z, label="predicted", agg="mean_of_norm",
                                                                    norm=norm))


def test_register_rule_for_custom_module():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.s

    calls = []

    @register_rule(Scale)
    class ScaleRule(LayerRule):
        def grad_sample(self, module, inputs, kwargs, g, names):
            calls.append(1)
            return {"s": g * inputs[0].unsqueeze(0)}

    try:
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 3)).double().eval()
        x = torch.randn(5, 3, dtype=torch.float64)
        got, _ = per_sample_grad_norms(model, x, label_cot, norm="l2sq")
        assert calls
        torch.testing.assert_close(got, naive_norms(model, x, label_cot, "l2sq"), rtol=1e-10, atol=0)
    finally:
        engine._RULES.pop(Scale, None)


def test_subclass_with_own_forward_uses_fallback():
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) ** 2

    class Plain(nn.Linear):
        pass

    assert rule_for(Odd(2, 2)) is FALLBACK
    assert rule_for(Plain(2, 2)) is rule_for(nn.Linear(2, 2))


def test_refuses_coupled_samples_and_bad_arguments():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    model.train()
    with pytest.raises(UvoodError, match="training mode"):
        per_sample_grad_norms(model, x, label_cot)
    model.eval()
    per_sample_grad_norms(model, x, label_cot)
    stats_free = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).eval()
    with pytest.raises(UvoodError, match="track_running_stats=False"):
        per_sample_grad_norms(stats_free, x, label_cot)
    with pytest.raises(UvoodError, match="l1, l2sq"):
        per_sample_grad_norms(model, x, label_cot, norm="l2")
    with pytest.raises(UvoodError, match="K x n x C"):
        per_sample_grad_norms(model, x, lambda z: z)
    frozen = nn.Sequential(nn.Linear(3, 2)).requires_grad_(False)
    with pytest.raises(UvoodError, match="requires grad"):
        per_sample_grad_norms(frozen, x, label_cot)


def test_inference_tensors_and_no_grad_context():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    with torch.inference_mode():
        x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        got, _ = per_sample_grad_norms(model, x, label_cot)
    torch.testing.assert_close(got, naive_norms(model, x.clone(), label_cot, "l1"), rtol=1e-10, atol=0)


def test_backward_modes_and_chunks_give_same_values():
    """Batched (vmap) or per-cotangent backward, cotangent chunks and micro-batches: same numbers."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5)).double().eval()
    x = torch.randn(7, 2, 4, 4, dtype=torch.float64)
    a, _ = per_sample_grad_norms(model, x, label_cot)
    old = engine.BATCHED_BACKWARD
    try:
        engine.BATCHED_BACKWARD = not old
        b, _ = per_sample_grad_norms(model, x, label_cot)
    finally:
        engine.BATCHED_BACKWARD = old
    c, _ = per_sample_grad_norms(model, x, label_cot, batch_size=3, max_rows=7)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=0)


def test_several_norms_in_one_pass_equal_separate_passes():
    """norm=("l1", "l2sq") gives exactly what two single-norm passes give (MLP and CNN layers)."""
    from uvood.scores.gradient import deep_label_norms, grad_deep

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 6), nn.ReLU(), nn.Linear(6, 5)).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(7, 2, 5, 5, dtype=torch.float64)
    cot = lambda z: (torch.eye(z.shape[1], dtype=z.dtype)[:, None, :] - torch.softmax(z, 1)[None])  # noqa: E731
    both, _ = per_sample_grad_norms(model, x, cot, norm=("l1", "l2sq"), batch_size=3)
    for j, nm in enumerate(("l1", "l2sq")):
        one, _ = per_sample_grad_norms(model, x, cot, norm=nm, batch_size=3)
        torch.testing.assert_close(both[j], one, rtol=1e-12, atol=0)
    label_norms, logits = deep_label_norms(model, x, T=1.0, batch_size=4)
    torch.testing.assert_close(label_norms["l1"], both[0], rtol=1e-12, atol=0)
    from uvood.scores.gradient import mean_of_norm_from_label_norms

    for label, weight, nm in [("uniform", "none", "l1"), ("predicted", "none", "l2sq"),
                              ("predicted", "logp_over_p", "l2sq")]:
        direct = grad_deep(model, x, label=label, agg="mean_of_norm", norm=nm, weight=weight)
        derived = mean_of_norm_from_label_norms(label_norms[nm], logits, label=label, weight=weight)
        torch.testing.assert_close(derived, direct, rtol=1e-10, atol=0)


def test_conv_with_channels_last_activations():
    """Some kernels return a non-contiguous weight gradient (channels-last input): still exact."""
    from uvood.scores.gradient import grad_deep
    from uvood.scores.reference import reference_grad_score

    class CL(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 3, 3, padding=1)
            self.c2 = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 3 * 3, 3)

        def forward(self, x):
            x = torch.relu(self.c1(x)).contiguous(memory_format=torch.channels_last)
            return self.fc(torch.relu(self.c2(x)).flatten(1))

    torch.manual_seed(0)
    model = CL().eval()
    x = torch.randn(4, 2, 5, 5)
    for agg in ("norm_of_mean", "mean_of_norm"):
        got = grad_deep(model, x, label="uniform", agg=agg, norm="l1")
        ref = reference_grad_score(model, x, label="uniform", agg=agg, norm="l1", depth="deep")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- coverage: every parameter the engine claims


class ParentLinear(nn.Module):
    """A child's weight used through F.linear in the parent's forward; the child is never called."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(torch.nn.functional.linear(x, self.a.weight, self.a.bias)))


class TiedTranspose(nn.Module):
    """Tied weights: a layer is called, and its weight is used again (transposed) by the parent."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(torch.nn.functional.linear(h, self.a.weight.T)))


class SharedParameter(nn.Module):
    """One Parameter object owned by two modules, both called."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class CalledTwiceAndReused(nn.Module):
    """A module called twice whose weight the parent also reads directly."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.a(x))))
        return self.head(h * self.a.weight.sum(0))


class ConvReadByParent(nn.Module):
    """A convolution called normally whose weight the parent also uses through F.conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 16, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = torch.tanh(torch.nn.functional.conv2d(y, self.conv.weight, padding=1))
        return self.head(y.flatten(1))


COVERAGE_MODELS = [(Twice, (7, 5)), (ParentLinear, (7, 5)), (TiedTranspose, (7, 5)), (SharedParameter, (7, 5)),
                   (CalledTwiceAndReused, (7, 5)), (ConvReadByParent, (7, 2, 4, 4))]


@pytest.mark.parametrize("model_cls,shape", COVERAGE_MODELS, ids=[m.__name__ for m, _ in COVERAGE_MODELS])
@pytest.mark.parametrize("agg", ["norm_of_mean", "mean_of_norm"])
def test_parameters_used_outside_their_module_match_float64_reference(model_cls, shape, agg):
    from uvood.scores.gradient import grad_deep
    from uvood.scores.reference import reference_grad_score

    torch.manual_seed(5)
    model = model_cls().double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    for norm in ("l1", "l2sq"):
        got = grad_deep(model, x, label="uniform", agg=agg, norm=norm, batch_size=3)  # several micro-batches
        ref = reference_grad_score(model, x, label="uniform", agg=agg, norm=norm, depth="deep")
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)


def test_uncovered_parameters_are_found_and_named():
    torch.manual_seed(5)
    model = TiedTranspose().double().eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    tape = engine._Tape([model.a, model.head], safe=False)
    try:
        logits = model(x)
    finally:
        tape.remove()
    selected = {id(p): p for p in model.parameters()}
    records = [r for r in tape.records if r.output.requires_grad]
    assert engine.uncovered_params(logits, records, selected) == {id(model.a.weight)}
    plain = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    tape = engine._Tape([plain[0], plain[2]], safe=False)
    try:
        logits = plain(x)
    finally:
        tape.remove()
    assert engine.uncovered_params(logits, tape.records, {id(p): p for p in plain.parameters()}) == set()


def test_batchgrad_offsets_with_uncovered_parameters():
    torch.manual_seed(6)
    model = TiedTranspose().double().eval()
    x = torch.randn(5, 5, dtype=torch.float64)
    offsets = {id(p): torch.randn_like(p) for p in model.parameters()}
    got, _ = per_sample_grad_norms(model, x, label_cot, norm="l1", offsets=offsets, batch_size=2)
    torch.testing.assert_close(got, naive_norms(model, x, label_cot, "l1", offsets=offsets), rtol=1e-10, atol=0)


def test_uncovered_parameters_that_torch_func_cannot_handle_are_named():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.nn.functional.linear(x, self.a.weight)
            if float(h.detach().sum()) > 0:  # data-dependent Python control flow: no vmap
                h = -h
            return self.head(torch.tanh(h))

    model = Branchy().eval()
    with pytest.raises(UvoodError, match=r"\['a.weight'\].*outside their own module"):
        per_sample_grad_norms(model, torch.randn(3, 4), label_cot)


def test_output_gradient_buffers_are_reused_across_micro_batches():
    """_output_grads writes the K gradients into one buffer per output kept in the pass's cache: the next
    micro-batch (here smaller) reuses its first rows, another K replaces it; the values are autograd's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)).eval()
    cache: dict = {}
    storages = []
    for n, K in ((5, 3), (4, 3), (4, 2)):
        x = torch.randn(n, 2, 4, 4)
        h = model[0](x)
        z = model[3](model[2](model[1](h)))
        v = torch.randn(K, n, 4)
        got = engine._output_grads(z, [h], v, True, cache)[0]
        for k in range(K):
            torch.testing.assert_close(got[k], torch.autograd.grad(model[3](model[2](model[1](h))), h, v[k])[0],
                                       rtol=0, atol=0)
        storages.append(got.untyped_storage().data_ptr())
    assert storages[1] == storages[0] and list(cache) == [0] and cache[0].shape[:2] == (4, 2)
