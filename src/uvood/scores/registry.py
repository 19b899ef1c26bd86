"""ONE registry of score names, serving the Python API, the CLI and the benchmark tables.

Spec grammar (whitespace ignored)::

    spec  := term ('*' term)*              # a product U * V * ... of registered terms
    term  := NAME | NAME '(' args ')'
    args  := arg (',' arg)*
    arg   := VALUE | KEY '=' VALUE           # a bare VALUE fills the entry's positional parameters
    VALUE := number | inf | true | false | identifier

Examples: ``msp``, ``energy(T=2)``, ``norm(0.3)``, ``norm(inf)*tv``, ``norm(0.3)*energy``,
``grad(label=uniform,agg=mean_of_norm,norm=l2sq,depth=deep)``.

Every score is oriented "higher = more in-distribution" (where a term's natural sign is the
other way, its docstring says how it was oriented). Scores are never flipped after the fact.
One caveat, for products only: a product is "higher = more ID" where every factor is >= 0. All
registered terms are, except ``energy`` (T logsumexp(z / T) < 0 when every logit is below
-T log C) and ``entropy`` (<= 0) and the gradient scores with sign -1: where such a factor is
negative, a larger ``norm(p)`` makes ``norm(p)*energy`` *smaller*, i.e. the U factor then votes
OOD, and the product's orientation flips for that sample (:class:`ProductScore`). The paper's
products (Section 4.3, Figure 2) are defined this way and uvood keeps them as defined.

A :class:`Score` is computed either from cached features ``(h, logits)``
(``needs_model = False``) or from the model and its inputs (``needs_model = True``: deep
gradients, BatchGrad). Modules register their terms with :func:`register`.

Versions: every registered name carries an integer ``version`` (``register(..., version=)``),
to be bumped whenever a change alters the values it computes; a change that alters only some
configurations of a name bumps theirs alone (the built score's ``config_version``, e.g. one
row of ``grad``), so the other configurations keep their caches. A built score's
:attr:`Score.version_tag` (``"energy:1"``, ``"norm:1*energy:1"``) enters every cache key of
its values, so a formula fix is never hidden by a warm cache.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UvoodError


class Score:
    """A configured score. Subclasses implement :meth:`from_features` or :meth:`from_model`."""

    #: canonical spec string, set by the registry
    spec: str = ""
    #: True when the score needs the model and the raw inputs (gradients), not just (h, logits)
    needs_model: bool = False
    #: True when the score must see in-distribution data first (``fit``), e.g. BatchGrad anchors
    needs_fit: bool = False
    #: the registry versions of its terms, e.g. ``"norm:1*energy:1"`` (set by :func:`get_score`)
    version_tag: str = ""

    def from_features(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise UvoodError(
            f"Score {self.spec!r} needs the model's gradients, not just cached features: "
            "use uvood.Detector or uvood.score_model(spec, model, x)."
        )

    def from_model(self, model, x: torch.Tensor, head=None) -> torch.Tensor:
        """Default: one forward pass in eval mode, then :meth:`from_features`."""
        from ..model import eval_mode, forward_features

        with torch.no_grad(), eval_mode(model):
            h, logits = forward_features(model, x, head)
        return self.from_features(h, logits)

    def fit(self, model, x: torch.Tensor, y: torch.Tensor | None, head=None, seed: int = 0) -> None:
        """Learn what the score needs from ID data (no-op for most scores)."""

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors learned by :meth:`fit` (saved by ``Detector.save``)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise UvoodError(f"Score {self.spec!r} has no fitted state, but the file holds {sorted(state)}.")

    def __repr__(self) -> str:
        return f"<score {self.spec}>"


@dataclass
class Entry:
    """One registered name: its factory, parameters (with defaults) and documentation."""

    name: str
    factory: Callable[..., Score]
    params: dict[str, Any] = field(default_factory=dict)
    positional: tuple[str, ...] = ()
    kind: str = "output"  # output | encoding | gradient
    doc: str = ""
    choices: dict[str, tuple] = field(default_factory=dict)
    #: bumped whenever a change alters the values this name computes (it enters every cache key)
    version: int = 1


_REGISTRY: dict[str, Entry] = {}


def register(
    name: str,
    factory: Callable[..., Score],
    *,
    params: dict[str, Any] | None = None,
    positional: tuple[str, ...] = (),
    kind: str = "output",
    doc: str = "",
    choices: dict[str, tuple] | None = None,
    version: int = 1,
) -> None:
    """Register ``name``; ``factory(**params)`` must return a :class:`Score`.

    ``choices`` restricts string-valued parameters to a set of values (checked at parse time).
    ``version``: bump it when a change alters the values ``name`` computes (module docstring).
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"invalid score name {name!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"score version must be an int >= 1, got {version!r}")
    _REGISTRY[name] = Entry(name, factory, dict(params or {}), positional, kind,
                            doc or (factory.__doc__ or ""), dict(choices or {}), version)
    _CANONICAL.clear()  # a new or changed name may change how specs read


def entries() -> dict[str, Entry]:
    _ensure_loaded()
    return dict(_REGISTRY)


def list_scores() -> list[str]:
    """All registered score names (use a spec string to parameterise or multiply them)."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def _ensure_loaded() -> None:
    # the modules that register terms; importing them fills the registry
    from . import encoding, fitted, gen, gradient, odin, output, shaping, since  # noqa: F401


# ---------------------------------------------------------------- parsing

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_.+-]*)|(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                    r"|(?P<punct>[()*,=]))")


def _tokens(spec: str) -> list[str]:
    pos, out = 0, []
    spec = spec.strip()
    while pos < len(spec):
        m = _TOKEN.match(spec, pos)
        if not m or m.end() == pos:
            raise UvoodError(f"Cannot parse score spec {_clip(spec)} at position {pos} ({spec[pos:pos + 10]!r}). "
                             "Expected e.g. 'energy', 'norm(0.3)*energy' or 'energy(T=2)'.")
        out.append(m.group(0).strip())
        pos = m.end()
    return [t for t in out if t]


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("inf", "+inf", "infinity"):
        return math.inf
    if low == "true":
        return True
    if low == "false":
        return False
    try:
        f = float(text)
    except ValueError:
        return low
    return int(f) if re.fullmatch(r"[-+]?\d+", text) and math.isfinite(f) else f


def _clip(text: Any, n: int = 60) -> str:
    """``repr(text)`` for an error message, cut to its first ``n`` characters and its length when longer."""
    r = repr(text)
    return r if len(r) <= n + 20 else f"{r[:n]}... ({len(r)} characters)"


def _kind_error(value: Any, default: Any) -> str | None:
    """What a parameter's value must be, judged by its default (None when ``value`` fits):
    ``true``/``false`` for a boolean, a number for a numeric (or unset) one."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if default is None or isinstance(default, (int, float)):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None


def _closest(name: str) -> str:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.4)
    if close:
        return ", ".join(close)
    names = sorted(_REGISTRY)  # no close match: the first dozen, so that the message stays short
    return ", ".join(names[:12]) + (f", ... ({len(names)} names)" if len(names) > 12 else "")


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return repr(v) if v != int(v) else str(int(v)) if abs(v) < 1e15 else repr(v)
    return str(v)


def parse_term(name: str, args: list[tuple[str | None, str]]) -> tuple[Entry, dict[str, Any]]:
    if name not in _REGISTRY:
        raise UvoodError(f"Unknown score {_clip(name)}. Closest valid names: {_closest(name)}. "
                         "Run `uvood scores` or uvood.list_scores() for all of them.")
    entry = _REGISTRY[name]
    values: dict[str, Any] = {}
    n_pos = 0
    for key, raw in args:
        if key is None:
            if n_pos >= len(entry.positional):
                raise UvoodError(f"Score {name!r} takes {len(entry.positional)} positional argument(s) "
                                 f"({', '.join(entry.positional) or 'none'}); got {_clip(raw)}. Use key=value.")
            key = entry.positional[n_pos]
            n_pos += 1
        if key not in entry.params:
            key = {k.lower(): k for k in entry.params}.get(key.lower(), key)
        if key not in entry.params:
            valid = ", ".join(entry.params) or "none"
            raise UvoodError(f"Score {name!r} has no parameter {_clip(key)}. Valid parameters: {valid}.")
        if key in values:
            raise UvoodError(f"Parameter {key!r} given twice in score {name!r}.")
        value = _value(raw)
        kind = _kind_error(value, entry.params[key])
        if kind:
            example = _format_value(entry.params[key] if entry.params[key] is not None else 1)
            raise UvoodError(f"Score {name!r}: {key}={_clip(raw)} is not valid; {key} must be {kind}, e.g. "
                             f"{name}({key}={example}).")
        if key in entry.choices and value not in entry.choices[key]:
            raise UvoodError(f"Score {name!r}: {key}={_clip(raw)} is not valid; choose one of "
                             f"{', '.join(map(_format_value, entry.choices[key]))}.")
        values[key] = value
    for key in entry.positional:
        if key not in values and entry.params.get(key, None) is None:
            raise UvoodError(f"Score {name!r} needs its parameter {key!r}, e.g. {name}(0.3).")
    return entry, values


def _canonical(entry: Entry, values: dict[str, Any]) -> str:
    shown = {k: v for k, v in values.items() if entry.params.get(k) != v or k in entry.positional}
    if not shown:
        return entry.name
    parts = []
    for k in entry.params:
        if k not in shown:
            continue
        parts.append(_format_value(shown[k]) if k in entry.positional else f"{k}={_format_value(shown[k])}")
    return f"{entry.name}({','.join(parts)})"


def parse(spec: str) -> list[tuple[Entry, dict[str, Any]]]:
    """Parse a spec string into its factors ``[(entry, explicit_params), ...]``."""
    _ensure_loaded()
    if not isinstance(spec, str) or not spec.strip():
        raise UvoodError(f"A score spec must be a non-empty string, got {_clip(spec)}. Example: 'norm(0.3)*energy'.")
    toks = _tokens(spec)
    factors, i = [], 0
    while True:
        if i >= len(toks) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", toks[i]):
            raise UvoodError(f"Cannot parse score spec {_clip(spec)}: expected a score name at token {i + 1}.")
        name = toks[i].lower()
        i += 1
        args: list[tuple[str | None, str]] = []
        if i < len(toks) and toks[i] == "(":
            i += 1
            while i < len(toks) and toks[i] != ")":
                if i + 1 < len(toks) and toks[i + 1] == "=":
                    if i + 2 >= len(toks):
                        raise UvoodError(f"Cannot parse score spec {_clip(spec)}: missing value after '='.")
                    args.append((toks[i], toks[i + 2]))
                    i += 3
                else:
                    args.append((None, toks[i]))
                    i += 1
                if i < len(toks) and toks[i] == ",":
                    i += 1
            if i >= len(toks):
                raise UvoodError(f"Cannot parse score spec {_clip(spec)}: missing ')'.")
            i += 1
        factors.append(parse_term(name, args))
        if i == len(toks):
            return factors
        if toks[i] != "*":
            raise UvoodError(f"Cannot parse score spec {_clip(spec)}: expected '*' between terms, "
                             f"got {_clip(toks[i])}.")
        i += 1


class ProductScore(Score):
    """U * V * ...: the product of its factors (the encoding-output composition, Section 3.1).

    The product is taken as is, as the paper defines it (Section 4.3). It is oriented "higher =
    more ID" only where every factor is >= 0: for a sample whose Energy is negative (every logit
    below -T log C), a larger ||h||_p makes ``norm(p)*energy`` smaller, so the orientation of the
    U factor flips for that sample (tested in ``tests/test_scores.py``). ``norm(p)`` times
    ``msp``, ``tv``, ``varsum`` or ``maxlogit`` of positive logits does not flip.
    """

    def __init__(self, factors: list[Score]):
        self.factors = factors
        self.needs_model = any(f.needs_model for f in factors)
        self.needs_fit = any(f.needs_fit for f in factors)

    def from_features(self, h, logits):
        out = self.factors[0].from_features(h, logits)
        for f in self.factors[1:]:
            out = out * f.from_features(h, logits)
        return out

    def from_model(self, model, x, head=None):
        if not self.needs_model:
            return super().from_model(model, x, head)
        out = self.factors[0].from_model(model, x, head)
        for f in self.factors[1:]:
            out = out * f.from_model(model, x, head)
        return out

    def fit(self, model, x, y, head=None, seed=0):
        for f in self.factors:
            f.fit(model, x, y, head=head, seed=seed)

    def state(self):
        return {f"{i}.{k}": v for i, f in enumerate(self.factors) for k, v in f.state().items()}

    def load_state(self, state):
        for i, f in enumerate(self.factors):
            f.load_state({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)})


def get_score(spec: str | Score) -> Score:
    """Build the :class:`Score` for a spec string (or return a Score unchanged).

    A chain ``shaper > ... > spec`` (activation shaping, then a score: ``react(90)>energy``) is built by
    :func:`uvood.scores.shaping.compose`."""
    if isinstance(spec, Score):
        return spec
    if isinstance(spec, str) and ">" in spec:
        from .shaping import compose

        return compose(spec)
    factors = []
    for entry, values in parse(spec):
        score = entry.factory(**{**entry.params, **values})
        score.spec = _canonical(entry, values)
        score.version_tag = f"{entry.name}:{max(entry.version, getattr(score, 'config_version', 0))}"
        factors.append(score)
    if len(factors) == 1:
        return factors[0]
    product = ProductScore(factors)
    product.spec = "*".join(f.spec for f in factors)
    product.version_tag = "*".join(f.version_tag for f in factors)
    return product


def score_versions(spec: str | Score) -> dict[str, int]:
    """``{name: version}`` of the registered terms a score is made of (for run manifests)."""
    s = get_score(spec)
    return {name: int(v) for name, v in (t.split(":") for t in s.version_tag.split("*") if t)}


#: spec string -> its canonical form (building a score to read its spec costs ~0.2 ms; reports ask thousands of
#: times); emptied whenever a name is registered
_CANONICAL: dict[str, str] = {}


def canonical_spec(spec: str) -> str:
    """The normalised form of a spec, used as the key of tables and caches."""
    if not isinstance(spec, str):
        return get_score(spec).spec
    out = _CANONICAL.get(spec)
    if out is None:
        out = _CANONICAL[spec] = get_score(spec).spec
    return out
