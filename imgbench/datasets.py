"""The dataset registry and the loaders that turn a source into checked images.

A dataset comes from one of three sources, all ending as the same
``LoadedDataset``:

* an offline mirror: a folder holding one sub-folder per dataset key, each laid
  out as ``<split>/<class>/<file>`` (set ``IMGBENCH_DATASETS_DIR`` or
  ``--datasets-dir``);
* any local image folder with that layout (``--dataset-path key=PATH``);
* the Hugging Face Hub, through the ``datasets`` library, exported once into a
  cache folder with the same layout and then read like a local folder.

Scanning decodes every image, hashes its bytes, and reports junk files,
undecodable images and duplicates, none of which is ever sampled.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imgbench.errors import ConfigError, DatasetError
from imgbench.images import ImageDecodeError, inspect_image, is_junk_name

logger = logging.getLogger(__name__)

DATASETS_DIR_ENV = "IMGBENCH_DATASETS_DIR"
CACHE_DIR_ENV = "IMGBENCH_CACHE_DIR"


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the 2023 study and where a public copy lives."""

    key: str
    title: str
    hub_id: str | None
    train_split: str
    test_split: str
    image_column: str = "image"
    label_column: str = "label"
    note: str = ""


# Hub ids were checked against the dataset cards on the Hugging Face Hub.
# Splits: the training pool is sampled from train_split only; test_split is the
# full test set that every case is scored on.
REGISTRY: dict[str, DatasetSpec] = {
    spec.key: spec
    for spec in (
        DatasetSpec("beans", "Beans leaf disease (Makerere AI Lab), 3 classes",
                    "AI-Lab-Makerere/beans", "train", "test", label_column="labels"),
        DatasetSpec("cars", "Stanford Cars, 196 classes", "tanganke/stanford_cars", "train", "test"),
        DatasetSpec("clothing", "Clothing1M, 14 classes", None, "train", "test",
                    note="Clothing1M is distributed by its authors on request and has no public "
                         "Hub copy; pass a local folder with --dataset-path clothing=PATH."),
        DatasetSpec("food", "Food-101, 101 classes", "ethz/food101", "train", "validation",
                    note="The Hub copy names the official test split 'validation'."),
        DatasetSpec("intel", "Intel Image Classification (scenes), 6 classes", None, "train", "test",
                    note="The public Hub copies of the Kaggle dataset need manual downloads or "
                         "are unverified; pass a local folder with --dataset-path intel=PATH."),
        DatasetSpec("pets", "Oxford-IIIT Pets, 37 classes", "timm/oxford-iiit-pet", "train", "test"),
        DatasetSpec("xrays", "Chest X-ray pneumonia (Kermany et al.), 2 classes",
                    "hf-vision/chest-xray-pneumonia", "train", "test"),
    )
}


@dataclass(frozen=True)
class ImageRecord:
    """One decodable, de-duplicated image of a split."""

    path: Path
    label: str
    sha256: str
    split: str

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class ScanReport:
    """Problems found while scanning, besides the usable images, with counts per kind."""

    junk: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    train_test_duplicates: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    label_conflicts: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "junk": len(self.junk),
            "undecodable": len(self.undecodable),
            "duplicates": len(self.duplicates),
            "train_test_duplicates": len(self.train_test_duplicates),
            "empty_classes": len(self.empty_classes),
            "label_conflicts": len(self.label_conflicts),
        }

    def summary(self) -> str:
        parts = [f"{count} {name.replace('_', ' ')}" for name, count in self.counts().items() if count]
        return ", ".join(parts) if parts else "no problems"


@dataclass
class LoadedDataset:
    """A scanned dataset: class names, training pool and test set."""

    key: str
    source: str
    root: Path
    classes: list[str]
    train: list[ImageRecord]
    test: list[ImageRecord]
    report: ScanReport

    def class_counts(self, split: str = "train") -> dict[str, int]:
        records = self.train if split == "train" else self.test
        counts = Counter(record.label for record in records)
        return {name: counts.get(name, 0) for name in self.classes}


def get_spec(key: str) -> DatasetSpec:
    try:
        return REGISTRY[key]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {key!r}; valid datasets: {', '.join(sorted(REGISTRY))}"
        ) from None


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgbench"


@dataclass(frozen=True)
class DatasetSource:
    """The source of one dataset's files: a folder, or the Hub through a cache."""

    key: str
    kind: str  # "folder", "mirror" or "hub"
    location: str

    def describe(self) -> str:
        return f"{self.kind}:{self.location}"


def resolve_source(
    key: str,
    datasets_dir: str | os.PathLike[str] | None = None,
    dataset_paths: dict[str, str] | None = None,
) -> DatasetSource:
    """Pick the source for ``key``: explicit folder, then offline mirror, then the Hub."""
    spec = get_spec(key)
    if dataset_paths and key in dataset_paths:
        return DatasetSource(key, "folder", str(Path(dataset_paths[key]).expanduser().resolve()))
    if datasets_dir:
        mirror = Path(datasets_dir).expanduser().resolve()
        if not mirror.is_dir():
            raise DatasetError(
                f"the datasets folder {str(mirror)!r} does not exist; set {DATASETS_DIR_ENV} or "
                "--datasets-dir to a folder that holds one sub-folder per dataset"
            )
        folder = mirror / key
        if not folder.is_dir():
            present = sorted(p.name for p in mirror.iterdir() if p.is_dir())
            raise DatasetError(
                f"dataset {key!r} is missing from the datasets folder {str(mirror)!r} "
                f"(it holds: {', '.join(present) or 'nothing'}); add {key}/<split>/<class>/<image> "
                f"there, or leave out --datasets-dir and {DATASETS_DIR_ENV} to download from the Hugging Face Hub"
            )
        return DatasetSource(key, "mirror", str(folder))
    if spec.hub_id is None:
        raise DatasetError(f"dataset {key!r} has no public Hub copy. {spec.note}")
    return DatasetSource(key, "hub", spec.hub_id)


def load_dataset(source: DatasetSource, cache_dir: Path | None = None) -> LoadedDataset:
    """Load and scan the dataset that ``source`` points to."""
    spec = get_spec(source.key)
    if source.kind == "hub":
        root = export_hub_dataset(spec, cache_dir or default_cache_dir())
    else:
        root = Path(source.location)
    return scan_folder(root, key=spec.key, source=source.describe(),
                       train_split=spec.train_split, test_split=spec.test_split)


def export_hub_dataset(spec: DatasetSpec, cache_dir: Path) -> Path:
    """Download ``spec`` from the Hub once and write it as an image folder."""
    assert spec.hub_id is not None
    target = cache_dir / "hub" / spec.hub_id.replace("/", "__")
    done_marker = target / ".complete"
    if done_marker.exists():
        return target
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise ConfigError(
            "loading from the Hugging Face Hub needs the 'datasets' package: "
            "pip install 'imgbench[hub]', or set IMGBENCH_DATASETS_DIR to offline copies"
        ) from exc
    logger.info("downloading %s from the Hugging Face Hub into %s", spec.hub_id, target)
    for split in (spec.train_split, spec.test_split):
        try:
            rows = hf_datasets.load_dataset(spec.hub_id, split=split)
        except Exception as exc:  # the datasets library raises many unrelated types
            raise DatasetError(
                f"downloading {spec.hub_id!r} split {split!r} from the Hugging Face Hub failed "
                f"({type(exc).__name__}: {exc}); without internet access set {DATASETS_DIR_ENV} "
                "to a folder of offline copies"
            ) from exc
        write_rows_as_folder(rows, target / split, spec.image_column, spec.label_column)
    done_marker.touch()
    return target


def write_rows_as_folder(rows, split_dir: Path, image_column: str, label_column: str) -> None:
    """Write rows of a ``datasets.Dataset`` as ``<class>/<index>.<ext>`` files."""
    names = rows.features[label_column].names
    for index, row in enumerate(rows.cast_column(image_column, _undecoded_image_feature(rows, image_column))):
        image = row[image_column]
        data = image.get("bytes") or Path(image["path"]).read_bytes()
        suffix = Path(image.get("path") or "").suffix.lower() or _guess_suffix(data)
        class_dir = split_dir / names[row[label_column]]
        class_dir.mkdir(parents=True, exist_ok=True)
        (class_dir / f"{index:06d}{suffix}").write_bytes(data)


def _undecoded_image_feature(rows, image_column: str):
    feature = rows.features[image_column]
    return type(feature)(decode=False)


def _guess_suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    return ".jpg"


_SPLIT_ALIASES = {"train": ("train", "training"), "test": ("test", "testing"),
                  "validation": ("validation", "val", "valid")}


def _find_split_dir(root: Path, split: str) -> Path | None:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        candidate = root / name
        if candidate.is_dir():
            return candidate
    return None


def scan_folder(root: Path, key: str, source: str, train_split: str = "train",
                test_split: str = "test") -> LoadedDataset:
    """Scan ``root/<split>/<class>/<file>`` and return the checked dataset."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist; check the path or the dataset source")
    report = ScanReport()
    splits: dict[str, list[ImageRecord]] = {}
    class_sets: dict[str, list[str]] = {}
    for role, split in (("train", train_split), ("test", test_split)):
        split_dir = _find_split_dir(root, split)
        if split_dir is None:
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DatasetError(
                f"dataset {key!r} at {str(root)!r} has no {split!r} split folder "
                f"(found: {', '.join(present) or 'no folders'}); lay images out as "
                f"<split>/<class>/<image>"
            )
        records, classes = _scan_split(split_dir, split, report)
        splits[role] = records
        class_sets[role] = classes

    classes = class_sets["train"]
    if not classes:
        raise DatasetError(
            f"dataset {key!r} at {str(root)!r} has no class folders with images under "
            f"{train_split!r}; lay images out as {train_split}/<class>/<image>"
        )
    unknown_test = sorted(set(class_sets["test"]) - set(classes))
    emptied_folders = [name for name in unknown_test if (_find_split_dir(root, train_split) / name).is_dir()]
    if emptied_folders:
        raise DatasetError(
            f"dataset {key!r}: the training folders {emptied_folders} under {train_split!r} have no usable images "
            f"(see the scan: {report.summary()}); add decodable images to them"
        )
    if unknown_test:
        raise DatasetError(
            f"dataset {key!r}: test classes {unknown_test} have no training images; "
            "every test class needs a training folder of the same name"
        )

    test_hashes = {record.sha256 for record in splits["test"]}
    train = []
    for record in splits["train"]:
        if record.sha256 in test_hashes:
            report.train_test_duplicates.append(str(record.path))
        else:
            train.append(record)
    emptied = [name for name in classes if not any(record.label == name for record in train)]
    if emptied:
        raise DatasetError(
            f"dataset {key!r}: every training image of class(es) {emptied} is also in the test set, so no "
            "training images are left; remove the duplicates from one of the splits"
        )
    if report.train_test_duplicates:
        logger.warning("dataset %s: %d training images also appear in the test set; "
                       "they are left out of the training pool", key, len(report.train_test_duplicates))

    dataset = LoadedDataset(key=key, source=source, root=root, classes=classes,
                            train=train, test=splits["test"], report=report)
    logger.info("dataset %s from %s: %d classes, %d training and %d test images (%s)",
                key, source, len(classes), len(train), len(dataset.test), report.summary())
    return dataset


def _scan_split(split_dir: Path, split: str, report: ScanReport) -> tuple[list[ImageRecord], list[str]]:
    records: list[ImageRecord] = []
    seen: dict[str, ImageRecord] = {}
    conflicting: set[str] = set()
    class_names = []
    for entry in sorted(split_dir.iterdir(), key=lambda p: p.name):
        if not entry.is_dir():
            report.junk.append(str(entry))
            continue
        class_names.append(entry.name)
        files = sorted((p for p in entry.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
        for path in files:
            if is_junk_name(path):
                report.junk.append(str(path))
                continue
            try:
                info = inspect_image(path.read_bytes(), str(path))
            except ImageDecodeError as exc:
                report.undecodable.append(str(exc))
                logger.warning("skipping undecodable image: %s", exc)
                continue
            first = seen.get(info.sha256)
            if first is not None and first.label != entry.name:
                # The same bytes under two labels: neither label can be trusted.
                report.label_conflicts.append(f"{path} (class {entry.name!r}) has the same bytes as "
                                              f"{first.path} (class {first.label!r})")
                conflicting.add(info.sha256)
                continue
            if first is not None:
                report.duplicates.append(f"{path} (same bytes as {first.path})")
                continue
            record = ImageRecord(path=path, label=entry.name, sha256=info.sha256, split=split)
            seen[info.sha256] = record
            records.append(record)
    if conflicting:
        logger.warning("%s: %d images appear under two class labels and are left out", split_dir, len(conflicting))
        records = [record for record in records if record.sha256 not in conflicting]
    classes = []
    for name in class_names:
        if any(record.label == name for record in records):
            classes.append(name)
        else:
            report.empty_classes.append(f"{split}/{name}")
            logger.warning("class folder %s has no usable images and is ignored", split_dir / name)
    return records, classes


_DATASET_PATH = re.compile(r"^(?P<key>[a-z0-9_]+)=(?P<path>.+)$")


def parse_dataset_paths(values: list[str]) -> dict[str, str]:
    """Parse ``key=PATH`` items of ``--dataset-path``."""
    parsed = {}
    for value in values:
        match = _DATASET_PATH.match(value)
        if not match:
            raise ConfigError(f"invalid --dataset-path {value!r}; expected KEY=PATH, e.g. beans=/data/beans")
        get_spec(match["key"])
        parsed[match["key"]] = match["path"]
    return parsed
