"""(h, logits) from one forward pass, on the model shapes users bring."""

import pytest
import torch
from torch import nn

import uvood
from uvood.errors import UvoodError
from uvood.model import eval_mode, find_head, forward_features


class SmallCNN(nn.Module):
    def __init__(self, c=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(16, c))

    def forward(self, x):
        return self.classifier(self.features(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class TinyResNet(nn.Module):
    """torchvision-style: conv stem, residual blocks, avgpool, flatten, self.fc."""

    def __init__(self, c=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, c)

    def forward(self, x):
        x = self.avgpool(self.layer1(self.conv1(x)))
        return self.fc(torch.flatten(x, 1))


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(self.body(x)).flatten(1)


def _check(model, x, head_module):
    with torch.no_grad(), eval_mode(model):
        h, logits = forward_features(model, x)
        out = model(x)
    torch.testing.assert_close(logits, out.reshape(out.shape[0], -1))
    assert h.shape[0] == x.shape[0] and h.ndim == 2
    # h really is the head's input: re-applying the head to h gives the logits
    if isinstance(head_module, nn.Linear):
        torch.testing.assert_close(head_module(h), logits)
    assert find_head(model, x) is head_module


def test_sequential_mlp():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Dropout(0.2), nn.Linear(7, 3))
    _check(m, torch.randn(5, 1, 3, 4), m[4])


def test_cnn_with_classifier_block_and_eval_mode_restored():
    m = SmallCNN()
    m.train()
    _check(m, torch.randn(4, 3, 8, 8), m.classifier[4])
    assert m.training and m.features[1].training  # flags restored after scoring


def test_torchvision_style_resnet():
    m = TinyResNet()
    _check(m, torch.randn(3, 3, 8, 8), m.fc)


def test_one_by_one_conv_head():
    m = ConvHead()
    x = torch.randn(2, 3, 6, 6)
    h, logits = forward_features(m, x)
    assert h.shape == (2, 6) and logits.shape == (2, 4)
    assert find_head(m, x) is m.head


def test_efficientnet_lite_random_weights():
    eff = pytest.importorskip("efficientnet_lite_pytorch")
    m = eff.EfficientNet.from_name("efficientnet-lite0", num_classes=11)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), eval_mode(m):
        h, logits = forward_features(m, x)
    assert h.shape == (2, 1280) and logits.shape == (2, 11)
    assert find_head(m, x) is m._fc
    torch.testing.assert_close(m._fc(h), logits)


def test_explicit_head_by_name_and_module():
    m = SmallCNN()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h1, _ = forward_features(m.eval(), x, head="classifier.1")
        h2, _ = forward_features(m, x, head=m.classifier[1])
    assert h1.shape == (2, 128)
    torch.testing.assert_close(h1, h2)


def test_no_head_error_says_how_to_pass_head():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UvoodError, match="head="):
        forward_features(m, torch.randn(2, 3, 5, 5))
    with pytest.raises(UvoodError, match="not a module"):
        forward_features(SmallCNN(), torch.randn(2, 3, 8, 8), head="nope")


class AuxNet(nn.Module):
    """Inception-style: a main and an auxiliary classifier with the same number of classes; the
    auxiliary one runs last. ``mode`` picks what forward returns."""

    def __init__(self, mode="main"):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.fc = nn.Linear(8, 4)
        self.aux = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
        self.mode = mode

    def forward(self, x):
        main = self.fc(self.body(x))
        aux = self.aux(x.flatten(1))
        if self.mode == "tuple":
            return main, aux
        if self.mode == "dict":
            return {"aux_logits": aux, "logits": main}
        if self.mode == "mixed":
            return main + 0.3 * aux
        return main


@pytest.mark.parametrize("mode", ["main", "tuple", "dict"])
def test_auxiliary_classifier_is_never_taken_as_head(mode):
    torch.manual_seed(0)
    m = AuxNet(mode).eval()
    x = torch.randn(5, 1, 3, 4)
    with torch.no_grad():
        h, logits = forward_features(m, x)
        main = m.fc(m.body(x))
    assert find_head(m, x) is m.fc
    torch.testing.assert_close(logits, main)
    torch.testing.assert_close(h, m.body(x))


def test_logits_no_layer_produces_ask_for_head():
    torch.manual_seed(0)
    m = AuxNet("mixed").eval()
    x = torch.randn(5, 1, 3, 4)
    with pytest.raises(UvoodError, match=r"candidates 'fc', 'aux.2'\. .*head="):
        forward_features(m, x)
    with torch.no_grad():
        _, logits = forward_features(m, x, head="fc")
    torch.testing.assert_close(logits, m.fc(m.body(x)))


def test_deep_scores_use_the_main_head_of_an_auxiliary_model():
    from uvood.scores.reference import reference_grad_score

    torch.manual_seed(1)
    m = AuxNet("tuple").double().eval()
    x = torch.randn(4, 1, 3, 4, dtype=torch.float64)
    got = uvood.score_model("exgrad(depth=deep)", m, x)
    ref = reference_grad_score(m, x, label="predicted", agg="mean_of_norm", norm="l1", depth="deep", head="fc")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)


def test_output_without_the_batch_axis_says_so():
    m = nn.Sequential(nn.Flatten(0), nn.Linear(12, 3))  # flattens everything: one output for the whole input
    with pytest.raises(UvoodError, match=r"shape \(3,\) for an input of shape \(4, 3\).*add the batch axis"):
        forward_features(m, torch.randn(4, 3))


def test_head_found_when_logits_are_nan_or_cast():
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).double()

    m = Cast()
    assert find_head(m, torch.randn(2, 4)) is m.fc
    with torch.no_grad():
        m.fc.bias[0] = float("nan")
    assert find_head(m, torch.randn(2, 4)) is m.fc
