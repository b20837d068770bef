"""Deterministic, cumulative training samples ("ablations") and their manifests.

Each class's training pool is ranked by ``sha256(seed + image hash)``, which
depends only on image content, so the ranking is the same whatever the file
names, the file-system order or the machine. An ablation of N images per class
takes the first N of that ranking, so the 5-image sample is inside the
20-image one, and so on.

Roles follow the 2023 study's 80/20 training/validation split: within the
ranking every fifth image (positions 4, 9, 14, ...) is a validation image, so
any N that is a multiple of 5 contains exactly N/5 validation images (1 of 5, 4
of 20) and the roles are nested as well. A provider that validates internally
receives all N images as training images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from imgbench.datasets import ImageRecord, LoadedDataset
from imgbench.errors import AblationSkipped, ConfigError

STANDARD_ABLATIONS = (5, 20, 80, 320, 1280)
DEFAULT_SEED = "imgbench-2023"
VALIDATION_EVERY = 5


@dataclass(frozen=True)
class PlannedImage:
    """One image of an ablation plan with its role."""

    record: ImageRecord
    role: str  # "train" or "validation"

    @property
    def label(self) -> str:
        return self.record.label


@dataclass(frozen=True)
class AblationPlan:
    """The training and validation images of one (dataset, N) pair."""

    dataset: str
    images_per_class: int
    seed: str
    classes: tuple[str, ...]
    images: tuple[PlannedImage, ...]

    def by_role(self, role: str) -> list[PlannedImage]:
        return [image for image in self.images if image.role == role]

    def merged(self) -> "AblationPlan":
        """Return the plan with every image as a training image (internal validation)."""
        images = tuple(PlannedImage(image.record, "train") for image in self.images)
        return AblationPlan(self.dataset, self.images_per_class, self.seed, self.classes, images)

    def manifest_rows(self) -> list[dict[str, str]]:
        return [
            {"path": str(image.record.path), "class": image.label, "role": image.role,
             "sha256": image.record.sha256}
            for image in self.images
        ]

    def manifest_hash(self) -> str:
        """Hash of (class, role, image hash) rows: equal hashes mean the same images."""
        digest = hashlib.sha256()
        for row in sorted(self.manifest_rows(), key=lambda r: (r["class"], r["role"], r["sha256"])):
            digest.update(f"{row['class']}\t{row['role']}\t{row['sha256']}\n".encode())
        return digest.hexdigest()

    def write_manifest(self, path: Path) -> None:
        payload = {
            "dataset": self.dataset,
            "images_per_class": self.images_per_class,
            "seed": self.seed,
            "manifest_sha256": self.manifest_hash(),
            "images": self.manifest_rows(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def rank_key(seed: str, sha256: str) -> str:
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def validate_ablation(images_per_class: int) -> None:
    if images_per_class < VALIDATION_EVERY or images_per_class % VALIDATION_EVERY:
        raise ConfigError(
            f"invalid ablation {images_per_class}: images per class must be a positive multiple of "
            f"{VALIDATION_EVERY} so the 80/20 training/validation split is exact; "
            f"the standard ablations are {', '.join(map(str, STANDARD_ABLATIONS))}"
        )


def plan_ablation(dataset: LoadedDataset, images_per_class: int, seed: str = DEFAULT_SEED) -> AblationPlan:
    """Sample ``images_per_class`` images of each class from the training pool.

    Raises ``AblationSkipped`` naming the smallest class when one class has
    fewer images than asked for.
    """
    validate_ablation(images_per_class)
    counts = dataset.class_counts("train")
    short = {name: count for name, count in counts.items() if count < images_per_class}
    if short:
        name, count = min(short.items(), key=lambda item: item[1])
        raise AblationSkipped(
            f"ablation {images_per_class} skipped for dataset {dataset.key!r}: class {name!r} has only "
            f"{count} training images (smallest class); choose an ablation of at most "
            f"{count // VALIDATION_EVERY * VALIDATION_EVERY}"
        )

    planned: list[PlannedImage] = []
    for name in dataset.classes:
        pool = [record for record in dataset.train if record.label == name]
        pool.sort(key=lambda record: rank_key(seed, record.sha256))
        for position, record in enumerate(pool[:images_per_class]):
            role = "validation" if position % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
            planned.append(PlannedImage(record, role))
    return AblationPlan(dataset.key, images_per_class, seed, tuple(dataset.classes), tuple(planned))
