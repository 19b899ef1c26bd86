"""Scores: pure functions of (h, logits) or of (model, x), all named in one registry."""

from .registry import Score, canonical_spec, entries, get_score, list_scores, register

__all__ = ["Score", "canonical_spec", "entries", "get_score", "list_scores", "register"]
