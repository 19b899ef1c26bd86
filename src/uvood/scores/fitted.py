"""Feature-statistics detectors fitted on ID training data: Mahalanobis, Mahalanobis++, RMDS, KNN,
ViM, NECO and fDBD. Every score is oriented higher = more in-distribution.

Notation: h = the head's input (N x D, the encoding of the paper, Section 3.1), z = W h + b the
logits (N x C), y the ID training labels, n the number of ID training samples. All statistics and
scores are computed in float64.

Fitting: :meth:`FittedScore.fit` runs the model over the ID data in batches (one forward pass,
:func:`uvood.features.extract`) and hands ``(h, logits, y)`` and the head's ``(W, b)`` to
:meth:`FittedScore.fit_features`, which the benchmark can call on cached features directly. The
fitted tensors are the score's :meth:`state` (saved by ``Detector.save`` without pickle); each state
holds ``shape = [D, C]``, so that scoring features of another width or class count is refused.

Conventions and how they differ from pytorch-ood 0.4.0 (the parity tests check both):

* covariance: uvood divides the scatter by n (the maximum-likelihood estimate of the papers'
  code, sklearn ``EmpiricalCovariance``) and inverts it with a pseudo-inverse (``pinvh``, as that
  code does); pytorch-ood uses the undivided scatter plus 1e-6 I. Distances therefore differ by the
  factor n (and the negligible ridge): Mahalanobis ``uvood = -2 n * pood``, RMDS ``uvood = -n * pood``.
* pytorch-ood returns outlier scores (higher = more OOD); uvood the negatives (KNN, ViM, fDBD:
  ``uvood = -pood``).
"""

from __future__ import annotations

import torch

from ..errors import UvoodError
from .neighbours import Float32Search, kth_similarity
from .output import energy
from .registry import Score, register

#: samples per forward pass when fitting (memory bound; no effect on values)
FIT_BATCH_SIZE = 256


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).reshape(t.shape[0], -1)


def head_weights(model, example: torch.Tensor, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's weight W (C x D) and bias b (C; zeros without bias), float64, detached."""
    from ..model import find_head

    module = find_head(model, example, head)
    w = module.weight.detach().to(torch.float64)
    w = w.reshape(w.shape[0], -1)
    b = module.bias
    b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.detach().to(torch.float64)
    return w.cpu(), b.cpu()


def fit_features_of(model, x: torch.Tensor, y, head=None):
    """(h, logits, y) of the ID data ``x`` from one batched forward pass (no cache)."""
    from ..features import extract

    feats = extract(model, x if y is None else (x, torch.as_tensor(y).reshape(-1)), batch_size=FIT_BATCH_SIZE,
                    head=head, progress=False)
    return feats.h, feats.logits, feats.y


def class_labels(y, n: int, num_classes: int, method: str) -> torch.Tensor:
    """Validated int64 labels: given, one per sample, in [0, C), every class present (class-conditional fits)."""
    if y is None:
        raise UvoodError(f"{method} fits class-conditional statistics and needs the ID training labels: "
                         "fit on (x, y) pairs, e.g. Detector(...).fit((x, y)).")
    y = torch.as_tensor(y).reshape(-1).long().cpu()
    if y.numel() != n:
        raise UvoodError(f"{method}: got {n} feature rows but {y.numel()} labels.")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise UvoodError(f"{method}: labels range over [{int(y.min())}, {int(y.max())}] but the model has "
                         f"{num_classes} classes.")
    missing = torch.nonzero(torch.bincount(y, minlength=num_classes) == 0).reshape(-1).tolist()
    if missing:
        raise UvoodError(f"{method} needs ID training samples of every class, but there are no samples of "
                         f"class(es) {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)} of "
                         f"{num_classes} missing). Fit on data that covers every class.")
    return y


def pinv_psd(a: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix (sklearn ``pinvh``: eigenvalues below
    ``max(D) * eps * max|lambda|`` are treated as zero)."""
    vals, vecs = torch.linalg.eigh(a)
    cut = vals.abs().max() * a.shape[0] * torch.finfo(a.dtype).eps
    inv = torch.where(vals > cut, 1.0 / torch.where(vals > cut, vals, torch.ones_like(vals)), torch.zeros_like(vals))
    return (vecs * inv) @ vecs.T


def tied_gaussian(h: torch.Tensor, y: torch.Tensor, num_classes: int, method: str):
    """Class means mu_k (C x D) and the shared precision P = pinv(Sigma) with
    Sigma = (1/n) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T (Lee et al. 2018, Eq. 1)."""
    n, d = h.shape
    if n < d + num_classes:
        raise UvoodError(f"{method}: {n} ID samples for {d} feature dimensions and {num_classes} classes: the "
                         f"shared covariance is singular (rank <= n - C). Fit on at least D + C = "
                         f"{d + num_classes} samples.")
    onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64)
    mu = (onehot.T @ h) / onehot.sum(0)[:, None]
    centred = h - mu[y]
    return mu, pinv_psd(centred.T @ centred / n)


def squared_mahalanobis(h: torch.Tensor, mu: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """d_k(h) = (h - mu_k)^T P (h - mu_k), N x K, via the expansion h P h - 2 h P mu_k + mu_k P mu_k."""
    hp = h @ precision
    return ((hp * h).sum(1, keepdim=True) - 2.0 * hp @ mu.T + ((mu @ precision) * mu).sum(1)[None, :]).clamp_min(0.0)


def l2_normalise(h: torch.Tensor) -> torch.Tensor:
    """h / ||h||_2 per row (rows of zeros stay zero)."""
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-300)


class FittedScore(Score):
    """A score with statistics fitted on ID data by :meth:`fit_features`, kept as named tensors.

    Subclasses set ``_keys`` (the fitted tensors' attribute names), ``needs_labels`` and
    ``needs_head``, and implement :meth:`_fit` and :meth:`_score`.
    """

    needs_fit = True
    needs_labels = False
    needs_head = False
    _keys: tuple[str, ...] = ()
    method = "score"

    def __init__(self):
        self.shape: torch.Tensor | None = None
        for k in self._keys:
            setattr(self, k, None)

    def fit(self, model, x, y, head=None, seed=0):
        """Extract (h, logits) of the ID data ``x`` (batched forward passes) and fit on them."""
        h, logits, y = fit_features_of(model, x, y, head)
        w, b = head_weights(model, x[:1], head) if self.needs_head else (None, None)
        self.fit_features(h, logits, y, weight=w, bias=b)

    def fit_features(self, h, logits, y=None, weight=None, bias=None) -> FittedScore:
        """Fit on ID features ``h`` (n x D), ``logits`` (n x C), labels ``y`` and the head's W, b."""
        h, logits = _f64(h), _f64(logits)
        if h.shape[0] == 0:
            raise UvoodError(f"{self.method}: the ID fitting data is empty.")
        if self.needs_head:
            if weight is None:
                raise UvoodError(f"{self.method} needs the head's weights: fit(model, x, y) or "
                                 "fit_features(h, logits, y, weight=W, bias=b).")
            weight = weight.detach().to(torch.float64).cpu()
            bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().double().cpu()
            if weight.shape != (logits.shape[1], h.shape[1]):
                raise UvoodError(f"{self.method}: the head's weight is {tuple(weight.shape)} but the features give "
                                 f"C x D = {logits.shape[1]} x {h.shape[1]}.")
        if self.needs_labels:
            y = class_labels(y, h.shape[0], logits.shape[1], self.method)
        self._fit(h.cpu(), logits.cpu(), y, weight, bias)
        self.shape = torch.tensor([h.shape[1], logits.shape[1]])
        return self

    def _fit(self, h, logits, y, weight, bias) -> None:
        raise NotImplementedError

    def _score(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_features(self, h, logits):
        if self.shape is None:
            raise UvoodError(f"Score {self.spec!r} must be fitted on ID training data first: "
                             "uvood.Detector(model, score=...).fit(id_data), or score.fit(model, x, y).")
        d, c = (int(v) for v in self.shape)
        h, logits = _f64(h), _f64(logits)
        if h.shape[1] != d or logits.shape[1] != c:
            raise UvoodError(f"Score {self.spec!r} was fitted on features of width D = {d} with C = {c} classes, "
                             f"but got D = {h.shape[1]}, C = {logits.shape[1]}: score with the model it was "
                             "fitted on, or fit it again.")
        device = h.device
        return self._score(h.cpu(), logits.cpu()).to(device)

    def state(self):
        if self.shape is None:
            return {}
        return {"shape": self.shape, **{k: getattr(self, k) for k in self._keys}}

    def load_state(self, state):
        need = {"shape", *self._keys}
        if set(state) != need:
            raise UvoodError(f"Score {self.spec!r} needs the fitted tensors {sorted(need)}; the file holds "
                             f"{sorted(state)}. Fit the detector again.")
        for k in self._keys:
            setattr(self, k, state[k].to(torch.float64) if state[k].is_floating_point() else state[k])
        self.shape = state["shape"].long()


def factors(score: Score) -> list[Score]:
    """The factors of a product U * V * ... (the score itself when it is not a product)."""
    return list(getattr(score, "factors", [score]))


def fit_on_features(score: Score, h, logits, y=None, weight=None, bias=None) -> Score:
    """Fit every :class:`FittedScore` factor of ``score`` (a spec's score, product or not) on cached ID
    features, e.g. in the benchmark; a factor that can only be fitted on the model (BatchGrad) is refused."""
    for f in factors(score):
        if f.needs_fit and not isinstance(f, FittedScore):
            raise UvoodError(f"Score {f.spec!r} is fitted on the model and its inputs, not on cached features: "
                             "use score.fit(model, x, y).")
    for f in factors(score):
        if isinstance(f, FittedScore):
            f.fit_features(h, logits, y, weight=weight, bias=bias)
    return score


# ---------------------------------------------------------------- Mahalanobis, Mahalanobis++, RMDS


class MahalanobisScore(FittedScore):
    """Mahalanobis (Lee et al., NeurIPS 2018, Eq. 2), oriented higher = more ID:

        S(x) = -min_k (h - mu_k)^T Sigma^-1 (h - mu_k)

    mu_k the class means of the ID training features, Sigma the shared (tied) covariance
    (1/n) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T, inverted with a pseudo-inverse as the paper's
    code does (sklearn ``EmpiricalCovariance``). Applied to the penultimate features h, without
    input perturbation or feature ensembles (no hyper-parameters).

    ``normalize=true``: Mahalanobis++ (Mueller & Hein, ICML 2025): every h (fitting and scoring) is
    first divided by its l2 norm, h / ||h||_2.

    pytorch-ood (``Mahalanobis``): outlier score 0.5 min_k d_k with the undivided scatter, so
    ``uvood = -2 n * pood`` (module docstring). Fewer than D + C samples: error (singular covariance).
    """

    needs_labels = True
    _keys = ("mu", "precision")

    def __init__(self, normalize=False):
        self.normalize = _bool("normalize", normalize)
        self.method = "Mahalanobis++" if self.normalize else "Mahalanobis"
        super().__init__()

    def _prep(self, h):
        return l2_normalise(h) if self.normalize else h

    def _fit(self, h, logits, y, weight, bias):
        self.mu, self.precision = tied_gaussian(self._prep(h), y, logits.shape[1], self.method)

    def _score(self, h, logits):
        return -squared_mahalanobis(self._prep(h), self.mu, self.precision).amin(dim=1)


class RMDSScore(FittedScore):
    """Relative Mahalanobis distance (Ren et al. 2021, "A Simple Fix to Mahalanobis Distance",
    Eq. 4), oriented higher = more ID:

        S(x) = -min_k [ d_k(h) - d_0(h) ]

    d_k the squared Mahalanobis distance to class k under the shared covariance (as
    :class:`MahalanobisScore`), d_0 the one under a single background Gaussian fitted to all ID
    features (mean mu_0, covariance (1/n) sum_i (h_i - mu_0)(h_i - mu_0)^T). No hyper-parameters.

    pytorch-ood (``RMD``): outlier score min_k [d_k - d_0] with undivided scatters: ``uvood = -n * pood``.
    """

    needs_labels = True
    _keys = ("mu", "precision", "mu0", "precision0")
    method = "RMDS"

    def _fit(self, h, logits, y, weight, bias):
        self.mu, self.precision = tied_gaussian(h, y, logits.shape[1], self.method)
        self.mu0 = h.mean(0, keepdim=True)
        centred = h - self.mu0
        self.precision0 = pinv_psd(centred.T @ centred / h.shape[0])

    def _score(self, h, logits):
        d0 = squared_mahalanobis(h, self.mu0, self.precision0)
        return -(squared_mahalanobis(h, self.mu, self.precision) - d0).amin(dim=1)


# ---------------------------------------------------------------- KNN


class KNNScore(FittedScore):
    """Deep nearest neighbours (Sun et al., ICML 2022, Eq. 1-2), oriented higher = more ID:

        S(x) = -|| z - z_(k) ||_2,   z = h / ||h||_2

    z_(k) the k-th nearest of the normalised ID training features. Default k = 50 (the paper's
    choice for CIFAR-10; 1000 for ImageNet, where it also subsamples the training set). Computed
    as sqrt(2 - 2 s_(k)), s_(k) the exact float64 k-th largest similarity z^T z_j, searched in float32
    (:func:`uvood.scores.neighbours.kth_similarity`). ``backend`` (attribute, not part of the spec; same
    values): "auto" (the pruned search; on a bank without low-rank structure faiss's search when installed, else
    the brute force), "brute"
    ("torch" is its older name), "faiss" or "pruned" (exact, skips the tiles of the bank whose bound cannot
    reach a query's neighbours).

    pytorch-ood (``KNN``, sklearn ``NearestNeighbors``): outlier score ||z - z_(k)||, ``uvood = -pood``.
    """

    _keys = ("bank",)
    method = "KNN"
    backend = "auto"

    def __init__(self, k=50):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UvoodError(f"knn(k) needs an integer k >= 1, got {k!r}. Example: knn(k=50).")
        self.k = k
        self._search = None
        super().__init__()

    def _fit(self, h, logits, y, weight, bias):
        if h.shape[0] < self.k:
            raise UvoodError(f"KNN: k = {self.k} but only {h.shape[0]} ID samples to fit on; use a smaller k "
                             "or more ID data.")
        self.bank = l2_normalise(h)
        self._search = None

    def _score(self, h, logits):
        if self._search is None or self._search.bank is not self.bank or self._search.requested != self.backend:
            self._search = Float32Search(self.bank, self.backend)
        kth = kth_similarity(l2_normalise(h), self.bank, self.k, self._search)
        return -(2.0 - 2.0 * kth).clamp_min(0.0).sqrt()

    def load_state(self, state):
        super().load_state(state)
        self._search = None


# ---------------------------------------------------------------- ViM, NECO


def vim_dim(d_features: int) -> int:
    """ViM's default principal dimension d. The official code takes 1000 for D >= 2048, else 512;
    uvood keeps that for D >= 768 and takes D // 2 below, where 512 would leave little or no residual space."""
    if d_features >= 2048:
        return 1000
    if d_features >= 768:
        return 512
    return d_features // 2


def _check_dim(d, name):
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
        raise UvoodError(f"{name}(d) needs an integer principal dimension d >= 1, got {d!r}.")


class ViMScore(FittedScore):
    """Virtual-logit matching (Wang et al., CVPR 2022, Eq. 7-9), oriented higher = more ID:

        S(x) = log sum_k exp(z_k) - alpha || R^T (h - u) ||_2

    u = -pinv(W) b (the origin of the head's logit space), R the D - d eigenvectors of the
    covariance (1/n) sum_i (h_i - u)(h_i - u)^T with the smallest eigenvalues (the residual
    space), alpha = mean_i max_k z_ik / mean_i ||R^T (h_i - u)|| over the ID training data. ``d``
    defaults to :func:`vim_dim`.

    pytorch-ood (``ViM``): outlier score alpha ||.|| - logsumexp(z), ``uvood = -pood`` (same d).
    """

    needs_head = True
    _keys = ("u", "residual", "alpha")
    method = "ViM"

    def __init__(self, d=None):
        _check_dim(d, "vim")
        self.d = d
        super().__init__()

    def _fit(self, h, logits, y, weight, bias):
        d = vim_dim(h.shape[1]) if self.d is None else self.d
        if d >= h.shape[1]:
            raise UvoodError(f"ViM: the principal dimension d = {d} must be smaller than the feature width "
                             f"D = {h.shape[1]}; use vim(d=...) with d < D.")
        self.u = -(torch.linalg.pinv(weight) @ bias)
        x = h - self.u
        _, vecs = torch.linalg.eigh(x.T @ x / x.shape[0])
        self.residual = vecs[:, : h.shape[1] - d].contiguous()
        self.alpha = (logits.amax(1).mean() / (x @ self.residual).norm(dim=1).mean()).reshape(1)

    def _score(self, h, logits):
        return energy(logits) - self.alpha * ((h - self.u) @ self.residual).norm(dim=1)


class NECOScore(FittedScore):
    """Neural-collapse-inspired OOD detection (Ammar et al., ICLR 2024, Eq. 6), higher = more ID:

        S(x) = || V_d^T (s(h) - m) ||_2 / || s(h) ||_2     (times max_k z_k with maxlogit=true)

    s(h) = (h - mean) / std, standardised with the ID training statistics (std 0 -> 1, as sklearn
    ``StandardScaler``), m the mean and V_d the top-d principal directions of the standardised ID
    features (sklearn ``PCA``, as the paper's code). The paper tunes d per model and multiplies by
    the maximum logit for its vision transformers (``maxlogit=true``). Default d: D // 2 (uvood's
    choice). No pytorch-ood peer: tested against sklearn StandardScaler + PCA.
    """

    _keys = ("mean", "std", "pca_mean", "components")
    method = "NECO"

    def __init__(self, d=None, maxlogit=False):
        _check_dim(d, "neco")
        self.d, self.maxlogit = d, _bool("maxlogit", maxlogit)
        super().__init__()

    def _fit(self, h, logits, y, weight, bias):
        d = h.shape[1] // 2 if self.d is None else self.d
        if d >= h.shape[1]:
            raise UvoodError(f"NECO: d = {d} must be smaller than the feature width D = {h.shape[1]}.")
        self.mean = h.mean(0)
        std = h.std(0, unbiased=False)
        self.std = torch.where(std > 0, std, torch.ones_like(std))
        s = (h - self.mean) / self.std
        self.pca_mean = s.mean(0)
        _, vecs = torch.linalg.eigh((s - self.pca_mean).T @ (s - self.pca_mean))
        self.components = vecs[:, -d:].flip(1).contiguous()

    def _score(self, h, logits):
        s = (h - self.mean) / self.std
        out = ((s - self.pca_mean) @ self.components).norm(dim=1) / s.norm(dim=1).clamp_min(1e-300)
        return out * logits.amax(1) if self.maxlogit else out


# ---------------------------------------------------------------- fDBD


class FDBDScore(FittedScore):
    """Fast decision-boundary distance (Liu & Qin, ICML 2024, Eq. 6), oriented higher = more ID:

        S(x) = 1/(C-1) sum_{c != yhat} |z_yhat - z_c| / ||w_yhat - w_c||_2 / ||h - mu||_2

    yhat = argmax_k z_k, w_c the rows of the head's W, mu the mean ID training feature (labels not
    needed). No hyper-parameters. pytorch-ood (``fDBD``): ``uvood = -pood``.
    """

    needs_head = True
    _keys = ("mu", "denom")
    method = "fDBD"

    def _fit(self, h, logits, y, weight, bias):
        sq = (weight * weight).sum(1)
        denom = (sq[:, None] + sq[None, :] - 2.0 * weight @ weight.T).clamp_min(0.0).sqrt()  # ||w_j - w_c||
        self.mu, self.denom = h.mean(0), denom.fill_diagonal_(1.0)  # the diagonal is never used (c != yhat)

    def _score(self, h, logits):
        zmax, pred = logits.max(dim=1)
        denom = self.denom[pred]
        ratio = (zmax[:, None] - logits).abs() / torch.where(denom > 0, denom, torch.ones_like(denom))
        dist = (h - self.mu).norm(dim=1).clamp_min(1e-300)
        return ratio.sum(1) / ((logits.shape[1] - 1) * dist)


def _bool(name, value):
    if not isinstance(value, bool):
        raise UvoodError(f"{name} must be true or false, got {value!r}.")
    return value


BOOLS = (False, True)
register("mahalanobis", MahalanobisScore, params={"normalize": False}, kind="fitted",
         choices={"normalize": BOOLS}, doc=MahalanobisScore.__doc__)
register("rmds", RMDSScore, kind="fitted", doc=RMDSScore.__doc__)
register("knn", KNNScore, params={"k": 50}, positional=("k",), kind="fitted", doc=KNNScore.__doc__)
register("vim", ViMScore, params={"d": None}, kind="fitted", doc=ViMScore.__doc__)
register("neco", NECOScore, params={"d": None, "maxlogit": False}, kind="fitted",
         choices={"maxlogit": BOOLS}, doc=NECOScore.__doc__)
register("fdbd", FDBDScore, kind="fitted", doc=FDBDScore.__doc__)
