"""The local provider's classifier: a linear model on pretrained-backbone embeddings.

A ``HeadRecipe`` fixes how embeddings become features (normalisation and the
use of a horizontally mirrored view) and how the regularisation strength is
chosen: one fixed value, or the best of several by stratified k-fold
cross-validation on the training images alone. ``LinearHead`` fits and applies
a recipe. Every step is deterministic for a fixed seed, so training twice on
the same images gives the same model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgbench.embedding import (BackboneSpec, EmbeddingCache, embed_views_with_cache, features_from_pixels,
                                get_backbone, load_model, preprocess)
from imgbench.errors import ConfigError

NORMALISATIONS = ("none", "standardise", "l2")
# "logistic": multinomial logistic regression (lbfgs). "ridge": one-vs-rest
# least squares with an L2 penalty of 1 / C, solved in closed form, so it
# fits in a fraction of the logistic regression's time. A softmax turns its
# class scores into probabilities.
CLASSIFIERS = ("logistic", "ridge")
# "none": the image's own embedding. "tta": the average of the image's and its
# mirror image's embeddings, at training and at prediction. "augment": both
# embeddings as separate training rows, and the average of both views' class
# probabilities at prediction.
FLIP_USES = ("none", "tta", "augment")


@dataclass(frozen=True)
class HeadRecipe:
    """Training settings of the linear classifier on embeddings."""

    normalisation: str = "standardise"
    flip: str = "none"
    classifier: str = "logistic"
    # Candidate inverse L2 regularisation strengths of the classifier.
    # One value is used as it is; several are compared by cross-validation.
    c_values: tuple[float, ...] = (0.1,)
    folds: int = 5

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"unknown normalisation {self.normalisation!r}; valid: {', '.join(NORMALISATIONS)}")
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(f"unknown classifier {self.classifier!r}; valid: {', '.join(CLASSIFIERS)}")
        if self.flip not in FLIP_USES:
            raise ConfigError(f"unknown flip use {self.flip!r}; valid: {', '.join(FLIP_USES)}")
        if not self.c_values or any(not math.isfinite(c) or c <= 0 for c in self.c_values):
            raise ConfigError(f"invalid c_values {self.c_values}; use one or more positive numbers")
        if self.folds < 2:
            raise ConfigError(f"invalid folds {self.folds}; use 2 or more")

    @property
    def views(self) -> int:
        """Embeddings needed per image: 1, or 2 with the mirror image."""
        return 1 if self.flip == "none" else 2


@dataclass
class LinearHead:
    """A fitted recipe: the normalisation statistics and the fitted classifier."""

    recipe: HeadRecipe
    seed: int = 0
    classes_: np.ndarray | None = None
    chosen_c: float | None = None
    # Mean cross-validated accuracy per candidate C; empty with one C.
    cv_accuracy: dict[float, float] = field(default_factory=dict)
    _mean: np.ndarray | None = None
    _scale: np.ndarray | None = None
    _model: object | None = None

    def fit(self, views: Sequence[np.ndarray], labels: Sequence[str]) -> "LinearHead":
        """Fit on one embedding matrix per view (rows are images, in the same order)."""
        self._check_views(views)
        labels = np.asarray(labels)
        if len(views) == 2 and views[0].shape != views[1].shape:
            raise ValueError(f"view shapes differ: {views[0].shape} and {views[1].shape}")
        c_values = self.recipe.c_values
        if len(c_values) > 1 and self._leave_one_out():
            self._fit_ridge_leave_one_out(views, labels)
        elif len(c_values) > 1:
            self.cv_accuracy = self.cross_validate(views, labels)
            # Ties go to the smaller C, the stronger regularisation.
            best = max(self.cv_accuracy.values())
            self.chosen_c = min(c for c, score in self.cv_accuracy.items() if score == best)
            self._fit_once(views, labels, self.chosen_c)
        else:
            self.chosen_c = c_values[0]
            self._fit_once(views, labels, self.chosen_c)
        return self

    def predict_proba(self, views: Sequence[np.ndarray]) -> np.ndarray:
        self._check_views(views)
        with _one_blas_thread():
            if self.recipe.flip == "augment":
                return np.mean([self._probabilities(self._transform(view)) for view in views], axis=0)
            return self._probabilities(self._transform(self._merge(views)))

    def _probabilities(self, features: np.ndarray) -> np.ndarray:
        if self.recipe.classifier == "logistic":
            return self._model.predict_proba(features)
        scores = self._model.decision_function(features)
        if scores.ndim == 1:  # two classes: the score of the second class against the first
            scores = np.stack([-scores, scores], axis=1)
        scores = scores - scores.max(axis=1, keepdims=True)
        exponentials = np.exp(scores)
        return exponentials / exponentials.sum(axis=1, keepdims=True)

    def predict(self, views: Sequence[np.ndarray]) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(views), axis=1)]

    def _check_views(self, views: Sequence[np.ndarray]) -> None:
        if len(views) != self.recipe.views:
            raise ValueError(f"flip use {self.recipe.flip!r} needs {self.recipe.views} views, got {len(views)}")

    def _merge(self, views: Sequence[np.ndarray]) -> np.ndarray:
        return views[0] if len(views) == 1 else (views[0] + views[1]) / 2

    def _rows(self, views: Sequence[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.recipe.flip == "augment":
            return np.concatenate(list(views)), np.concatenate([labels] * len(views))
        return self._merge(views), labels

    def _transform(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        if self.recipe.normalisation == "l2":
            return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        if self.recipe.normalisation == "standardise":
            return (features - self._mean) / self._scale
        return features

    def _leave_one_out(self) -> bool:
        """Tell whether C is chosen by leave-one-out, which ridge regression computes in closed form.

        Not with "augment": an image's mirror image would stay in the training rows.
        """
        return self.recipe.classifier == "ridge" and self.recipe.flip != "augment"

    def _fit_ridge_leave_one_out(self, views: Sequence[np.ndarray], labels: np.ndarray) -> None:
        """Score every C by leave-one-out accuracy, then fit ridge regression with the best one.

        scikit-learn's efficient leave-one-out (``RidgeClassifierCV`` with
        ``cv=None``) decomposes the features once for all candidate Cs and
        stores each image's left-out decision values. The accuracy is computed
        here from those values: on every two-class xrays ablation,
        scikit-learn 1.9's own choice (``alpha_``) was the smallest candidate C,
        whose leave-one-out accuracy computed this way was 0. Ties go to the
        smaller C, the stronger regularisation.
        """
        from sklearn.linear_model import RidgeClassifier, RidgeClassifierCV

        features, targets = self._rows(views, labels)
        self._set_normalisation(features)
        features = self._transform(features)
        c_values = sorted(self.recipe.c_values)
        search = RidgeClassifierCV(alphas=[1.0 / c for c in c_values], scoring="accuracy", store_cv_results=True)
        with _one_blas_thread():
            search.fit(features, targets)
        # Leave-one-out decision values: (images, classes or 1 for two classes, Cs).
        decisions = search.cv_results_
        if decisions.ndim == 2:
            decisions = decisions[:, None, :]
        if decisions.shape[1] == 1:
            predicted = search.classes_[(decisions[:, 0, :] > 0).astype(int)]
        else:
            predicted = search.classes_[np.argmax(decisions, axis=1)]
        self.cv_accuracy = {c: float(np.mean(predicted[:, index] == targets)) for index, c in enumerate(c_values)}
        best = max(self.cv_accuracy.values())
        self.chosen_c = min(c for c, score in self.cv_accuracy.items() if score == best)
        model = RidgeClassifier(alpha=1.0 / self.chosen_c, solver="cholesky")
        with _one_blas_thread():
            model.fit(features, targets)
        self._model = model
        self.classes_ = model.classes_

    def _set_normalisation(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        self._mean = features.mean(axis=0)
        # Constant features keep a scale of 1 so they map to 0 instead of dividing by 0.
        scale = features.std(axis=0)
        self._scale = np.where(scale > 1e-12, scale, 1.0)

    def _fit_once(self, views: Sequence[np.ndarray], labels: np.ndarray, c: float) -> None:
        from sklearn.linear_model import LogisticRegression, RidgeClassifier

        features, targets = self._rows(views, labels)
        self._set_normalisation(features)
        if self.recipe.classifier == "logistic":
            model = LogisticRegression(C=c, max_iter=5000)
        else:
            model = RidgeClassifier(alpha=1.0 / c, solver="cholesky")
        with _one_blas_thread():
            model.fit(self._transform(features), targets)
        self._model = model
        self.classes_ = model.classes_

    def cross_validate(self, views: Sequence[np.ndarray], labels: Sequence[str]) -> dict[float, float]:
        """Return the mean accuracy per candidate C over stratified folds of the images.

        Both views of an image fall in the same fold, so a mirror image never
        helps predict its own original.
        """
        from sklearn.model_selection import StratifiedKFold

        labels = np.asarray(labels)
        smallest = min(np.unique(labels, return_counts=True)[1])
        folds = StratifiedKFold(n_splits=max(2, min(self.recipe.folds, smallest)), shuffle=True,
                                random_state=self.seed)
        scores: dict[float, list[float]] = {c: [] for c in self.recipe.c_values}
        for train_index, test_index in folds.split(np.zeros(len(labels)), labels):
            train_views = [view[train_index] for view in views]
            test_views = [view[test_index] for view in views]
            for c in self.recipe.c_values:
                fold_head = LinearHead(self.recipe, self.seed)
                fold_head._fit_once(train_views, labels[train_index], c)
                predicted = fold_head.predict(test_views)
                scores[c].append(float(np.mean(predicted == labels[test_index])))
        return {c: float(np.mean(values)) for c, values in scores.items()}


def _one_blas_thread():
    """Run BLAS on one thread: the matrices are small, and a fixed thread count keeps results reproducible.

    On this project's 2-core machine a logistic regression on 960 embeddings fit
    several times faster on one thread than on two while other processes ran.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


@dataclass(frozen=True)
class LocalMode:
    """A training mode of the local provider: which embeddings, and which head recipe on them.

    ``backbones`` are (backbone name, input size) pairs whose embeddings are
    concatenated, in that order.
    """

    name: str
    backbones: tuple[tuple[str, int], ...]
    pooling: str
    recipe: HeadRecipe
    description: str

    def specs(self) -> list[list[BackboneSpec]]:
        """Per backbone, the spec of each view the recipe needs (the image, then its mirror image)."""
        specs = []
        for name, size in self.backbones:
            spec = get_backbone(name, size, self.pooling)
            specs.append([spec, spec.flipped()][:self.recipe.views])
        return specs

    def embed(self, items: Sequence[tuple[str, bytes, str]],
              cache_root: Path | None) -> tuple[list[np.ndarray], int]:
        """Return one feature matrix per view and the count of images decoded, using the cache when given."""
        per_backbone = []
        computed = 0
        for specs in self.specs():
            caches = [EmbeddingCache(cache_root, spec) if cache_root else None for spec in specs]
            matrices, count = embed_views_with_cache(items, specs, caches)
            per_backbone.append(matrices)
            computed = max(computed, count)
        return [np.concatenate([matrices[view] for matrices in per_backbone], axis=1)
                for view in range(self.recipe.views)], computed

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Embed preprocessed batches, one per backbone (see ``preprocess_batch``); one matrix per view."""
        per_backbone = []
        for specs, batch in zip(self.specs(), pixels, strict=True):
            views = []
            for spec in specs:
                views.append(features_from_pixels(np.ascontiguousarray(batch[:, :, :, ::-1]) if spec.flip else batch,
                                                  spec))
            per_backbone.append(views)
        return [np.concatenate([views[view] for views in per_backbone], axis=1)
                for view in range(self.recipe.views)]

    def preprocess_batch(self, images: Sequence[bytes], labels: Sequence[str] | None = None) -> list[np.ndarray]:
        """Decode and resize images for each backbone, without mirroring; one NCHW batch per backbone."""
        return [preprocess(images, specs[0], labels) for specs in self.specs()]

    def load(self) -> None:
        for specs in self.specs():
            load_model(specs[0])
