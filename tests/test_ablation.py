"""Tests of imgbench.ablation: deterministic, nested training samples and manifests.

``plan_ablation`` reads only the records of a ``LoadedDataset``, so most tests
build datasets from ``ImageRecord`` values with made-up hashes. The tests on
real files copy the mini beans dataset into ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from imgbench.ablation import DEFAULT_SEED, AblationPlan, plan_ablation, validate_ablation
from imgbench.datasets import ImageRecord, LoadedDataset, ScanReport, scan_folder
from imgbench.errors import AblationSkipped, ConfigError

MINI_BEANS = Path(__file__).parent / "data" / "mini" / "beans"


def fake_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def synthetic_dataset(per_class: dict[str, int], key: str = "synthetic") -> LoadedDataset:
    """Build a dataset with ``per_class[name]`` training records for each class and no files on disk."""
    train = [
        ImageRecord(path=Path("train") / name / f"{i}.jpg", label=name,
                    sha256=fake_sha256(f"{key}/{name}/{i}"), split="train")
        for name, count in per_class.items()
        for i in range(count)
    ]
    test = [ImageRecord(path=Path("test") / name / "0.jpg", label=name,
                        sha256=fake_sha256(f"{key}/test/{name}"), split="test")
            for name in per_class]
    return LoadedDataset(key=key, source="synthetic", root=Path("."), classes=list(per_class),
                         train=train, test=test, report=ScanReport())


def roles_by_hash(plan: AblationPlan) -> dict[str, str]:
    return {image.record.sha256: image.role for image in plan.images}


def scan_beans(root: Path) -> LoadedDataset:
    return scan_folder(root, key="beans", source=f"folder:{root}")


@pytest.fixture
def beans_dir(tmp_path: Path) -> Path:
    """A writable copy of the mini beans dataset: 3 classes of 10 training images."""
    return Path(shutil.copytree(MINI_BEANS, tmp_path / "beans"))


def test_plan_repeats_exactly() -> None:
    dataset = synthetic_dataset({"a": 30, "b": 30})

    first = plan_ablation(dataset, 10)
    second = plan_ablation(dataset, 10)

    assert first == second
    assert first.manifest_hash() == second.manifest_hash()


def test_plan_ignores_record_order() -> None:
    dataset = synthetic_dataset({"a": 30, "b": 30})
    shuffled = synthetic_dataset({"a": 30, "b": 30})
    random.Random(3).shuffle(shuffled.train)

    assert roles_by_hash(plan_ablation(shuffled, 10)) == roles_by_hash(plan_ablation(dataset, 10))


def test_plan_depends_on_seed() -> None:
    dataset = synthetic_dataset({"a": 30})

    default_plan = plan_ablation(dataset, 10)
    other_plan = plan_ablation(dataset, 10, seed="another-seed")

    assert default_plan.seed == DEFAULT_SEED
    assert roles_by_hash(default_plan) != roles_by_hash(other_plan)


def test_plan_ignores_file_names(beans_dir: Path, tmp_path: Path) -> None:
    # Copy every image under a new name, in reverse order, so names, sort
    # order and file creation order all differ from the original.
    renamed_dir = tmp_path / "renamed"
    for split_dir in sorted(beans_dir.iterdir()):
        for class_dir in sorted(split_dir.iterdir()):
            target_dir = renamed_dir / split_dir.name / class_dir.name
            target_dir.mkdir(parents=True)
            for index, image in enumerate(sorted(class_dir.iterdir(), reverse=True)):
                shutil.copyfile(image, target_dir / f"img_{index:03d}_{image.stem[::-1]}.jpg")

    original = plan_ablation(scan_beans(beans_dir), 5)
    renamed = plan_ablation(scan_beans(renamed_dir), 5)

    assert {image.record.path.name for image in original.images}.isdisjoint(
        {image.record.path.name for image in renamed.images})
    assert roles_by_hash(renamed) == roles_by_hash(original)
    assert renamed.manifest_hash() == original.manifest_hash()


def test_nested_samples_5_10_20() -> None:
    dataset = synthetic_dataset({"a": 23, "b": 20, "c": 40})

    small = roles_by_hash(plan_ablation(dataset, 5))
    medium = roles_by_hash(plan_ablation(dataset, 10))
    large = roles_by_hash(plan_ablation(dataset, 20))

    assert small.keys() <= medium.keys()
    assert medium.keys() <= large.keys()


def test_nested_roles_5_10_20() -> None:
    dataset = synthetic_dataset({"a": 23, "b": 20, "c": 40})

    small = roles_by_hash(plan_ablation(dataset, 5))
    medium = roles_by_hash(plan_ablation(dataset, 10))
    large = roles_by_hash(plan_ablation(dataset, 20))

    for sha256, role in small.items():
        assert medium[sha256] == role
        assert large[sha256] == role
    for sha256, role in medium.items():
        assert large[sha256] == role


def test_nested_on_real_images(beans_dir: Path) -> None:
    dataset = scan_beans(beans_dir)

    small = roles_by_hash(plan_ablation(dataset, 5))
    large = roles_by_hash(plan_ablation(dataset, 10))

    assert all(large.get(sha256) == role for sha256, role in small.items())


@pytest.mark.parametrize(("images_per_class", "train", "validation"), [(5, 4, 1), (10, 8, 2), (20, 16, 4)])
def test_split_sizes_per_class(images_per_class: int, train: int, validation: int) -> None:
    dataset = synthetic_dataset({"a": 20, "b": 25, "c": 31})

    plan = plan_ablation(dataset, images_per_class)

    for name in dataset.classes:
        roles = [image.role for image in plan.images if image.label == name]
        assert roles.count("train") == train, name
        assert roles.count("validation") == validation, name
    assert len(plan.by_role("train")) == 3 * train
    assert len(plan.by_role("validation")) == 3 * validation


def test_plan_keeps_class_order() -> None:
    dataset = synthetic_dataset({"zebra": 5, "ant": 5})

    plan = plan_ablation(dataset, 5)

    assert plan.classes == ("zebra", "ant")
    assert [image.label for image in plan.images] == ["zebra"] * 5 + ["ant"] * 5


def test_plan_uses_only_training_pool() -> None:
    dataset = synthetic_dataset({"a": 10, "b": 10})
    train_hashes = {record.sha256 for record in dataset.train}

    plan = plan_ablation(dataset, 10)

    assert {image.record.sha256 for image in plan.images} == train_hashes


def test_merged_makes_all_train() -> None:
    plan = plan_ablation(synthetic_dataset({"a": 20, "b": 20}), 20)

    merged = plan.merged()

    assert [image.role for image in merged.images] == ["train"] * 40
    assert [image.record for image in merged.images] == [image.record for image in plan.images]
    assert merged.images_per_class == 20
    assert len(plan.by_role("validation")) == 8


def test_skipped_names_smallest_class() -> None:
    dataset = synthetic_dataset({"a": 12, "b": 7, "c": 9}, key="tiny")

    with pytest.raises(AblationSkipped) as excinfo:
        plan_ablation(dataset, 10)

    message = str(excinfo.value)
    assert "'b'" in message
    assert "only 7 training images" in message
    assert "'tiny'" in message
    assert "at most 5" in message


def test_skipped_on_real_images(beans_dir: Path) -> None:
    (beans_dir / "train" / "healthy" / "healthy_train_0.jpg").unlink()

    with pytest.raises(AblationSkipped) as excinfo:
        plan_ablation(scan_beans(beans_dir), 10)

    assert "'healthy'" in str(excinfo.value)
    assert "only 9 training images" in str(excinfo.value)


def test_skipped_when_ablation_exceeds_pool(beans_dir: Path) -> None:
    with pytest.raises(AblationSkipped, match="only 10 training images"):
        plan_ablation(scan_beans(beans_dir), 20)


@pytest.mark.parametrize("images_per_class", [0, 7, -5, 3, 12])
def test_invalid_ablation_rejected(images_per_class: int) -> None:
    with pytest.raises(ConfigError) as excinfo:
        validate_ablation(images_per_class)

    assert f"invalid ablation {images_per_class}" in str(excinfo.value)
    assert "5, 20, 80, 320, 1280" in str(excinfo.value)


@pytest.mark.parametrize("images_per_class", [0, 7, -5])
def test_plan_rejects_invalid_ablation(images_per_class: int) -> None:
    with pytest.raises(ConfigError):
        plan_ablation(synthetic_dataset({"a": 20}), images_per_class)


def test_manifest_hash_stable(beans_dir: Path) -> None:
    first = plan_ablation(scan_beans(beans_dir), 10).manifest_hash()
    second = plan_ablation(scan_beans(beans_dir), 10).manifest_hash()

    assert first == second
    assert len(first) == 64


def test_manifest_hash_tracks_image_change(beans_dir: Path) -> None:
    # At 10 images per class the plan takes every training image, so a changed
    # image is always in it.
    before = plan_ablation(scan_beans(beans_dir), 10).manifest_hash()
    image_path = beans_dir / "train" / "bean_rust" / "bean_rust_train_0.jpg"
    with Image.open(image_path) as image:
        image.load()
    image.save(image_path, "JPEG", quality=40)

    after = plan_ablation(scan_beans(beans_dir), 10).manifest_hash()

    assert after != before


def test_manifest_hash_tracks_synthetic_change() -> None:
    dataset = synthetic_dataset({"a": 5, "b": 5})
    changed = synthetic_dataset({"a": 5, "b": 5})
    changed.train[0] = ImageRecord(path=changed.train[0].path, label="a",
                                   sha256=fake_sha256("edited"), split="train")

    assert plan_ablation(changed, 5).manifest_hash() != plan_ablation(dataset, 5).manifest_hash()


def test_manifest_hash_tracks_roles() -> None:
    plan = plan_ablation(synthetic_dataset({"a": 5}), 5)

    assert plan.merged().manifest_hash() != plan.manifest_hash()


def test_write_manifest_rows(beans_dir: Path, tmp_path: Path) -> None:
    plan = plan_ablation(scan_beans(beans_dir), 5)
    manifest_path = tmp_path / "out" / "manifests" / "beans-5.json"

    plan.write_manifest(manifest_path)
    payload = json.loads(manifest_path.read_text(encoding="utf-8"))

    assert payload["dataset"] == "beans"
    assert payload["images_per_class"] == 5
    assert payload["seed"] == DEFAULT_SEED
    assert payload["manifest_sha256"] == plan.manifest_hash()
    assert len(payload["images"]) == 15
    for row, image in zip(payload["images"], plan.images, strict=True):
        assert set(row) == {"path", "class", "role", "sha256"}
        assert row["path"] == str(image.record.path)
        assert row["class"] == image.label
        assert row["role"] == image.role
        assert row["sha256"] == image.record.sha256


def test_write_manifest_hashes_match_files(beans_dir: Path, tmp_path: Path) -> None:
    manifest_path = tmp_path / "beans-5.json"
    plan_ablation(scan_beans(beans_dir), 5).write_manifest(manifest_path)

    rows = json.loads(manifest_path.read_text(encoding="utf-8"))["images"]

    for row in rows:
        assert hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest() == row["sha256"]
