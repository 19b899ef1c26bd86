"""uvood: post-hoc OOD detection for PyTorch classifiers.

Data flow: data -> model features (h, logits) -> scores -> metrics -> reports.

    import uvood
    feats = uvood.extract(model, x)                        # (h, logits, y), cached on request
    s = uvood.score_features("norm(0.3)*energy", feats.h, feats.logits)
    uvood.metrics.auroc(s_id, s_ood)
    det = uvood.Detector(model, score="norm(0.3)*energy").fit(x_id)
    model = uvood.zoo.load("mnist-mlp"); x = uvood.data.sample("mnist")   # zoo and bundled data
"""

from . import data, metrics, zoo
from .api import score_features, score_model
from .detector import Detector
from .errors import UvoodError
from .features import Features, extract
from .model import forward_features
from .scores.registry import canonical_spec, get_score, list_scores

__version__ = "0.1.0"

__all__ = ["Detector", "Features", "UvoodError", "canonical_spec", "data", "extract", "forward_features", "get_score",
           "list_scores", "metrics", "score_features", "score_model", "zoo"]
