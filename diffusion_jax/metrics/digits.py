"""Sample quality for the bundled 8x8 digits: a small digit classifier as the "Inception".

The FID Inception network needs weights that are not available offline, so for the embedded
default dataset (scikit-learn's 8x8 digits, `input_pipeline.load_digits_arrays`) this module
trains its own feature network: an MLP ``64 -> 128 -> 64 -> 10`` (ReLU), fit deterministically
(full-batch AdamW from a fixed seed, float64 numpy on one thread) in about two seconds on a CPU,
on a FIXED train split of the 1797 digits (held-out accuracy 0.97). The other digits (held
out, never seen by the classifier) give the real reference and the real-data floor, so the
metric is never measured on the data the classifier was fit to.

Split (a fixed `numpy` permutation of the 1797 images, seed ``ClassifierRecipe.split_seed``)::

    train     1000 images   the classifier is fit on these only
    reference  400 images   the real statistics that samples (and the floor) are compared with
    floor      397 images   held-out real digits scored exactly like samples: the real floor

Metrics (`sample_quality`), all in the classifier's feature space:

* ``digits_fd``: the Frechet distance (`frechet.frechet_distance`, as FID) between Gaussians fitted
  to the 64-d penultimate activations of the samples and of the reference digits.
* ``digits_fd_floor``: the same for the held-out floor digits. The FD estimate is biased upward
  by the finite sample size (roughly ``+c / n``), so both are measured at the SAME size
  ``m = min(n, 397)`` (``digits_fd_size``): each is the mean FD of ``ceil(N / m)`` windows of
  ``m`` consecutive rows, evenly spaced over the N available rows (samples: N = n; floor:
  N = 397), which covers every row. Samples scoring ``digits_fd`` near ``digits_fd_floor`` are
  as close to the reference as real held-out digits are.
* ``digits_is`` / ``digits_is_real``: the Inception-Score analogue ``exp(E_x KL(p(y|x) || p(y)))``
  (`frechet.inception_score`, one split) of the samples / of all 797 held-out digits; at most 10.
* ``digits_confidence`` / ``digits_confidence_real``: the mean max-softmax probability.
* ``digits_classes`` / ``digits_classes_real``: how many of the 10 classes are predicted for at
  least half of their uniform share (``n / 20``) of the images (10 = no class missing);
  ``digits_class_frac_<k>``: the fraction of samples classified as ``k``.
* ``digits_classifier_accuracy``: the classifier's accuracy on the 797 held-out digits.

The classifier's float64 weights are cached as ``.npz`` in
``<cache>/digits_classifier/digits_mlp_<key>.npz``, ``<cache>`` being the FID cache directory
(`runtime.cache.default_cache_dir`: ``$DIFFUSION_JAX_CACHE``, else ``~/.cache/diffusion_jax``);
``<key>`` hashes the training recipe (`ClassifierRecipe`, including its ``version``) and the
bytes of the digits, so changing either retrains. Features are computed in float64 numpy from
the weights exactly as stored, so a classifier loaded from the cache gives bit-identical
features to the freshly trained one (and training itself is bit-reproducible on a given
numpy/BLAS build, whatever the thread count).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from diffusion_jax.metrics import frechet
from diffusion_jax.runtime import files

__all__ = [
    "DEFAULT_RECIPE",
    "ClassifierRecipe",
    "DigitsClassifier",
    "DigitsSplit",
    "cache_path",
    "features",
    "load_classifier",
    "load_digits_split",
    "sample_quality",
    "train_classifier",
    "windowed_frechet_distance",
]

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8)


@dataclasses.dataclass(frozen=True)
class ClassifierRecipe:
    """Everything that determines the classifier's weights (and the held-out split).

    Bump ``version`` whenever the training code changes in a way these fields do not capture;
    the cache key hashes all fields, so any change retrains.
    """

    version: int = 1
    split_seed: int = 20240613  # permutation of the 1797 digits
    num_train: int = 1000
    num_reference: int = 400  # the remaining 1797 - 1000 - 400 = 397 are the floor digits
    hidden: tuple[int, ...] = (128, 64)  # the last entry is the feature dimension
    steps: int = 300  # full-batch AdamW steps
    learning_rate: float = 1e-2  # peak; cosine decay to 0
    weight_decay: float = 1e-3
    init_seed: int = 0

    def key(self, data_fingerprint: str = "") -> str:
        """A 16-hex-digit hash of the recipe fields and ``data_fingerprint``."""
        payload = json.dumps(
            {"recipe": dataclasses.asdict(self), "data": data_fingerprint}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


DEFAULT_RECIPE = ClassifierRecipe()


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """The fixed split of the bundled digits: uint8 images [N, 8, 8, 1], int32 labels [N]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    reference_images: np.ndarray
    reference_labels: np.ndarray
    floor_images: np.ndarray
    floor_labels: np.ndarray
    fingerprint: str  # sha256 of all images and labels, in the stored order


@functools.lru_cache(maxsize=4)
def load_digits_split(recipe: ClassifierRecipe = DEFAULT_RECIPE) -> DigitsSplit:
    """The bundled 8x8 digits (uint8 0..255, as the training pipeline sees them) cut into the
    recipe's train / reference / floor parts by a fixed permutation (seed ``split_seed``).

    Memoised per recipe; the arrays are read-only.
    """
    from diffusion_jax.input_pipeline import load_digits_arrays

    images, labels = load_digits_arrays(IMAGE_SHAPE[0], 1)
    n = len(images)
    if recipe.num_train + recipe.num_reference + 2 > n:
        raise ValueError(f"recipe needs more than the {n} digits: {recipe}")
    digest = hashlib.sha256(images.tobytes())
    digest.update(labels.astype(np.int32).tobytes())
    perm = np.random.default_rng(recipe.split_seed).permutation(n)
    parts = np.split(perm, [recipe.num_train, recipe.num_train + recipe.num_reference])
    arrays = []
    for index in parts:
        for a in (images[index], labels[index]):
            a.flags.writeable = False
            arrays.append(a)
    return DigitsSplit(*arrays, fingerprint=digest.hexdigest())


def _to_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 8, 8, C] (C = 1, or 3 tiled grey: channels averaged) or [N, 8, 8] ->
    float64 [N, 64] in [-1, 1] (x / 127.5 - 1, the model range)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"digits images must be uint8 0..255, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:3] != IMAGE_SHAPE or images.shape[3] not in (1, 3):
        raise ValueError(f"digits images must be [N, 8, 8, 1 or 3], got shape {images.shape}")
    x = images.astype(np.float64).mean(axis=-1).reshape(len(images), -1)
    return x / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class DigitsClassifier:
    """The trained MLP: ``layers`` are float64 ``(w [in, out], b [out])``, the last one the
    10-way logit layer; hidden layers use ReLU. Inference is float64 numpy."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    recipe: ClassifierRecipe

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 8, 8, 1] -> (float64 features [N, D] (penultimate ReLU activations,
        D = ``recipe.hidden[-1]``), float64 logits [N, 10])."""
        from threadpoolctl import threadpool_limits

        h = _to_inputs(images)
        with threadpool_limits(limits=1):
            for w, b in self.layers[:-1]:
                h = np.maximum(h @ w + b, 0.0)
            w, b = self.layers[-1]
            return h, h @ w + b


def _adamw_fit(
    x: np.ndarray, y: np.ndarray, recipe: ClassifierRecipe
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Full-batch AdamW on the mean softmax cross-entropy of the ReLU MLP, float64 numpy with
    hand-written backpropagation; returns the float64 ``(w, b)`` layers.

    Not scikit-learn's MLPClassifier (its Adam takes an L2 penalty, not AdamW's decoupled
    decay: the recipe and the published scores would change) nor optax under jax (float32 by
    default, on whatever device runs): these lines are float64 numpy on one BLAS thread, so the
    cached classifier and the metric are the same on every machine."""
    widths = (x.shape[1], *recipe.hidden, NUM_CLASSES)
    rng = np.random.default_rng(recipe.init_seed)
    params = [
        [rng.standard_normal((i, o)) * np.sqrt(2.0 / i), np.zeros(o)]  # He-normal, zero bias
        for i, o in zip(widths[:-1], widths[1:], strict=True)
    ]
    first = [[np.zeros_like(a) for a in layer] for layer in params]
    second = [[np.zeros_like(a) for a in layer] for layer in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # optax.adamw's defaults
    onehot = np.eye(NUM_CLASSES)[y]
    for t in range(recipe.steps):
        activations = [x]
        for w, b in params[:-1]:
            activations.append(np.maximum(activations[-1] @ w + b, 0.0))
        logits = activations[-1] @ params[-1][0] + params[-1][1]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        delta = (z / z.sum(axis=1, keepdims=True) - onehot) / len(x)  # d loss / d logits
        grads: list[list[np.ndarray]] = [[] for _ in params]
        for i in range(len(params) - 1, -1, -1):
            grads[i] = [activations[i].T @ delta, delta.sum(axis=0)]
            if i:
                delta = (delta @ params[i][0].T) * (activations[i] > 0)
        lr = recipe.learning_rate * 0.5 * (1.0 + np.cos(np.pi * t / recipe.steps))  # cosine
        for layer, grad, m, v in zip(params, grads, first, second, strict=True):
            for j in range(2):
                m[j] = beta1 * m[j] + (1.0 - beta1) * grad[j]
                v[j] = beta2 * v[j] + (1.0 - beta2) * grad[j] ** 2
                m_hat = m[j] / (1.0 - beta1 ** (t + 1))
                v_hat = v[j] / (1.0 - beta2 ** (t + 1))
                step = m_hat / (np.sqrt(v_hat) + eps) + recipe.weight_decay * layer[j]
                layer[j] = layer[j] - lr * step
    return tuple((w, b) for w, b in params)


def train_classifier(
    recipe: ClassifierRecipe = DEFAULT_RECIPE, split: DigitsSplit | None = None
) -> DigitsClassifier:
    """Fit the MLP on the train split only (about 2 s on one CPU core).

    Full-batch AdamW (``optax.adamw`` semantics: decoupled weight decay, bias-corrected
    moments) with a cosine-decayed learning rate on the softmax cross-entropy, ``recipe.steps``
    steps from a He-normal initialisation drawn by ``numpy.random.default_rng(init_seed)``.
    Float64 numpy with BLAS limited to one thread: the weights are a deterministic function of
    the recipe and the data, bit-identical whatever the thread count (XLA's CPU matmuls are
    not: their reduction order depends on the number of intra-op threads).
    """
    from threadpoolctl import threadpool_limits

    split = load_digits_split(recipe) if split is None else split
    with threadpool_limits(limits=1):
        layers = _adamw_fit(_to_inputs(split.train_images), split.train_labels, recipe)
    return DigitsClassifier(layers=layers, recipe=recipe)


def cache_path(
    cache_dir: str | os.PathLike[str] | None = None,
    recipe: ClassifierRecipe = DEFAULT_RECIPE,
    data_fingerprint: str | None = None,
) -> Path:
    """``<cache_dir>/digits_classifier/digits_mlp_<key>.npz``; ``cache_dir`` defaults to the
    FID cache directory (``$DIFFUSION_JAX_CACHE``, else ``~/.cache/diffusion_jax``)."""
    if cache_dir is None:
        from diffusion_jax.runtime.cache import default_cache_dir

        cache_dir = default_cache_dir()
    if data_fingerprint is None:
        data_fingerprint = load_digits_split(recipe).fingerprint
    name = f"digits_mlp_{recipe.key(data_fingerprint)}.npz"
    return Path(cache_dir).expanduser() / "digits_classifier" / name


def _save(path: Path, classifier: DigitsClassifier, key: str) -> None:
    """Write the weights atomically (temporary file + rename); warn instead of failing."""
    arrays = {"key": np.asarray(key)}
    for i, (w, b) in enumerate(classifier.layers):
        arrays[f"w{i}"], arrays[f"b{i}"] = w, b
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as err:
        warnings.warn(f"could not cache the digits classifier at {path}: {err}", stacklevel=3)


def _load(path: Path, recipe: ClassifierRecipe, key: str) -> DigitsClassifier | None:
    """The cached classifier, or None when the file is missing, unreadable or for another key."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            num_layers = len(recipe.hidden) + 1
            layers = tuple(
                (data[f"w{i}"].astype(np.float64), data[f"b{i}"].astype(np.float64))
                for i in range(num_layers)
            )
    except (OSError, KeyError, ValueError):
        return None
    return DigitsClassifier(layers=layers, recipe=recipe)


def load_classifier(
    cache_dir: str | os.PathLike[str] | None = None,
    recipe: ClassifierRecipe = DEFAULT_RECIPE,
) -> DigitsClassifier:
    """The recipe's classifier from the cache (`cache_path`), trained and cached on a miss."""
    split = load_digits_split(recipe)
    key = recipe.key(split.fingerprint)
    path = cache_path(cache_dir, recipe, split.fingerprint)
    classifier = _load(path, recipe, key)
    if classifier is None:
        classifier = train_classifier(recipe, split)
        _save(path, classifier, key)
    return classifier


def features(
    images: np.ndarray,
    cache_dir: str | os.PathLike[str] | None = None,
    recipe: ClassifierRecipe = DEFAULT_RECIPE,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 8, 8, 1] digits -> (float64 penultimate features [N, 64], logits [N, 10]) of
    the (cached) classifier."""
    return load_classifier(cache_dir, recipe)(images)


def windowed_frechet_distance(
    feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, size: int, seed: int = 0
) -> float:
    """Mean Frechet distance to N(mu_ref, sigma_ref) of windows of ``size`` rows of ``feats``.

    The rows of ``feats`` [N, D] (N >= size >= 2) are put in a fixed random order (seed
    ``seed``, so samples stored sorted by class do not make class-pure windows), then covered
    by ``ceil(N / size)`` windows of exactly ``size`` consecutive rows whose starts are evenly
    spaced over ``[0, N - size]`` (they overlap when ``size`` does not divide N): every row
    counts and every FD has the same sample-size bias.
    """
    n = len(feats)
    if not 2 <= size <= n:
        raise ValueError(f"window size {size} must be in [2, {n}]")
    feats = feats[np.random.default_rng(seed).permutation(n)]
    count = -(-n // size)
    starts = np.rint(np.linspace(0, n - size, count)).astype(int)
    distances = []
    for start in starts:
        mu, sigma = frechet.compute_statistics(feats[start : start + size])
        distances.append(frechet.frechet_distance(mu, sigma, mu_ref, sigma_ref))
    return float(np.mean(distances))


def _class_scores(logits: np.ndarray, prefix: str, suffix: str = "") -> dict[str, float]:
    """IS (one split), mean max-confidence and the number of well-represented classes."""
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    counts = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES)
    present = counts >= 0.5 * len(logits) / NUM_CLASSES
    return {
        f"{prefix}_is{suffix}": frechet.inception_score(logits, splits=1)[0],
        f"{prefix}_confidence{suffix}": float(probs.max(axis=1).mean()),
        f"{prefix}_classes{suffix}": float(present.sum()),
    }


def sample_quality(
    images: np.ndarray,
    cache_dir: str | os.PathLike[str] | None = None,
    recipe: ClassifierRecipe = DEFAULT_RECIPE,
) -> dict[str, float]:
    """Sample-quality numbers of n >= 2 generated digits, uint8 [n, 8, 8, 1] (see the module
    docstring for the definitions and the held-out split).

    Returns floats keyed ``digits_fd``, ``digits_fd_floor``, ``digits_fd_size``, ``digits_is``,
    ``digits_is_real``, ``digits_confidence``, ``digits_confidence_real``, ``digits_classes``,
    ``digits_classes_real``, ``digits_class_frac_0`` .. ``digits_class_frac_9``,
    ``digits_classifier_accuracy``, and the two-sample test ``digits_c2st`` (samples against
    the reference digits) with its floor ``digits_c2st_floor`` (held-out digits against them).
    Writes nothing but the classifier cache (on a miss).
    """
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these are tiny [<= 1000, 64] problems, and a multi-threaded OpenBLAS on
    # a busy host spends ~50 ms per 64x64 eigh waiting for its threads.
    with threadpool_limits(limits=1):
        return _sample_quality(images, cache_dir, recipe)


def _sample_quality(
    images: np.ndarray,
    cache_dir: str | os.PathLike[str] | None,
    recipe: ClassifierRecipe,
) -> dict[str, float]:
    split = load_digits_split(recipe)
    classifier = load_classifier(cache_dir, recipe)
    sample_feats, sample_logits = classifier(images)
    n = len(sample_feats)
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    ref_feats, ref_logits = classifier(split.reference_images)
    floor_feats, floor_logits = classifier(split.floor_images)
    mu_ref, sigma_ref = frechet.compute_statistics(ref_feats)
    size = min(n, len(floor_feats))
    real_logits = np.concatenate([ref_logits, floor_logits])
    real_labels = np.concatenate([split.reference_labels, split.floor_labels])
    out = {
        "digits_fd": windowed_frechet_distance(sample_feats, mu_ref, sigma_ref, size),
        "digits_fd_floor": windowed_frechet_distance(floor_feats, mu_ref, sigma_ref, size),
        "digits_fd_size": float(size),
    }
    out.update(_class_scores(sample_logits, "digits"))
    out.update(_class_scores(real_logits, "digits", "_real"))
    counts = np.bincount(sample_logits.argmax(axis=1), minlength=NUM_CLASSES)
    out.update({f"digits_class_frac_{k}": float(counts[k] / n) for k in range(NUM_CLASSES)})
    out["digits_classifier_accuracy"] = float((real_logits.argmax(axis=1) == real_labels).mean())
    out["digits_c2st"] = two_sample_accuracy(images, split.reference_images)
    out["digits_c2st_floor"] = two_sample_accuracy(split.floor_images, split.reference_images)
    return out


def two_sample_accuracy(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """A two-sample classifier test on pixels: the 5-fold cross-validated accuracy of a
    logistic regression telling images `a` from images `b` (uint8 [N, 8, 8, 1]), on equally
    many of each (the first min(len) >= 2 of a fixed shuffle; fewer folds below 5 each).
    0.5 means indistinguishable.

    Unlike the Frechet distance in the classifier's features, which sees shapes, this sees the
    pixels themselves: noisy backgrounds, off-grid grey levels, blurred strokes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    x = [_to_inputs(v)[rng.permutation(len(v))[:n]] for v in (a, b)]
    y = np.r_[np.zeros(n), np.ones(n)]
    folds = StratifiedKFold(min(5, n), shuffle=True, random_state=seed)
    clf = LogisticRegression(max_iter=2000)
    return float(np.mean(cross_val_score(clf, np.concatenate(x), y, cv=folds)))
