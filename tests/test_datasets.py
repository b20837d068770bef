"""Tests of imgbench.datasets: folder scanning, source resolution and the registry.

Scanning tests copy the real sample images of ``tests/data/mini`` into
``tmp_path`` and damage the copy, so the shared sample folder is never written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imgbench.datasets import (
    DATASETS_DIR_ENV,
    REGISTRY,
    DatasetSource,
    get_spec,
    load_dataset,
    parse_dataset_paths,
    resolve_source,
    scan_folder,
)
from imgbench.errors import ConfigError, DatasetError

MINI_DIR = Path(__file__).parent / "data" / "mini"
BEANS_CLASSES = ["angular_leaf_spot", "bean_rust", "healthy"]


@pytest.fixture
def beans_dir(tmp_path: Path) -> Path:
    """A writable copy of the mini beans dataset: 3 classes, 10 training and 4 test images each."""
    return Path(shutil.copytree(MINI_DIR / "beans", tmp_path / "beans"))


@pytest.fixture
def messy_beans(beans_dir: Path) -> dict[str, Path]:
    """The beans copy with one of each problem that scanning reports.

    Returns the root and the path of each planted file, by problem.
    """
    train = beans_dir / "train"
    test = beans_dir / "test"

    ds_store = train / "bean_rust" / ".DS_Store"
    ds_store.write_bytes(b"\x00\x00\x00\x01Bud1")
    notes = train / "healthy" / "notes.txt"
    notes.write_text("collected in 2019\n", encoding="utf-8")

    broken = train / "healthy" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")

    # Sorted after healthy_train_0.jpg, so the original is the one kept.
    class_duplicate = train / "healthy" / "zz_copy_of_0.jpg"
    shutil.copyfile(train / "healthy" / "healthy_train_0.jpg", class_duplicate)

    leaked = train / "bean_rust" / "leaked_test_image.jpg"
    shutil.copyfile(test / "bean_rust" / "bean_rust_test_0.jpg", leaked)

    empty_class = train / "empty_class"
    empty_class.mkdir()

    return {
        "root": beans_dir,
        "ds_store": ds_store,
        "notes": notes,
        "broken": broken,
        "class_duplicate": class_duplicate,
        "leaked": leaked,
        "empty_class": empty_class,
    }


def scan(root: Path):
    return scan_folder(root, key="beans", source=f"folder:{root}")


def test_scan_mini_beans(beans_dir: Path) -> None:
    dataset = scan(beans_dir)

    assert dataset.classes == BEANS_CLASSES
    assert len(dataset.train) == 30
    assert len(dataset.test) == 12
    assert dataset.class_counts("train") == {name: 10 for name in BEANS_CLASSES}
    assert dataset.class_counts("test") == {name: 4 for name in BEANS_CLASSES}
    assert dataset.report.summary() == "no problems"


def test_scan_records_label_and_split(beans_dir: Path) -> None:
    dataset = scan(beans_dir)

    for record in dataset.train:
        assert record.label == record.path.parent.name
        assert record.split == "train"
    for record in dataset.test:
        assert record.split == "test"


def test_scan_mini_xrays(tmp_path: Path) -> None:
    root = Path(shutil.copytree(MINI_DIR / "xrays", tmp_path / "xrays"))

    dataset = scan_folder(root, key="xrays", source="test")

    assert dataset.classes == ["NORMAL", "PNEUMONIA"]
    assert len(dataset.train) == 20
    assert len(dataset.test) == 8


def test_scan_report_counts(messy_beans: dict[str, Path]) -> None:
    report = scan(messy_beans["root"]).report

    assert report.counts() == {
        "junk": 2,
        "undecodable": 1,
        "duplicates": 1,
        "train_test_duplicates": 1,
        "empty_classes": 1,
        "label_conflicts": 0,
    }


def test_scan_report_names_files(messy_beans: dict[str, Path]) -> None:
    report = scan(messy_beans["root"]).report

    assert sorted(report.junk) == sorted([str(messy_beans["ds_store"]), str(messy_beans["notes"])])
    assert str(messy_beans["broken"]) in report.undecodable[0]
    assert report.duplicates[0].startswith(str(messy_beans["class_duplicate"]))
    assert "healthy_train_0.jpg" in report.duplicates[0]
    assert report.train_test_duplicates == [str(messy_beans["leaked"])]
    assert report.empty_classes == ["train/empty_class"]


def test_scan_summary_lists_problems(messy_beans: dict[str, Path]) -> None:
    summary = scan(messy_beans["root"]).report.summary()

    assert "2 junk" in summary
    assert "1 undecodable" in summary
    assert "1 train test duplicates" in summary


def test_scan_excludes_problem_files(messy_beans: dict[str, Path]) -> None:
    dataset = scan(messy_beans["root"])
    used_paths = {record.path for record in dataset.train + dataset.test}

    for problem in ("ds_store", "notes", "broken", "class_duplicate", "leaked"):
        assert messy_beans[problem] not in used_paths, problem


def test_scan_keeps_first_duplicate(messy_beans: dict[str, Path]) -> None:
    dataset = scan(messy_beans["root"])
    train_paths = {record.path for record in dataset.train}

    assert messy_beans["root"] / "train" / "healthy" / "healthy_train_0.jpg" in train_paths


def test_scan_drops_train_test_duplicate(messy_beans: dict[str, Path]) -> None:
    dataset = scan(messy_beans["root"])
    test_hashes = {record.sha256 for record in dataset.test}

    assert all(record.sha256 not in test_hashes for record in dataset.train)
    assert dataset.class_counts("train") == {name: 10 for name in BEANS_CLASSES}
    assert len(dataset.test) == 12


def test_scan_ignores_empty_class(messy_beans: dict[str, Path]) -> None:
    dataset = scan(messy_beans["root"])

    assert "empty_class" not in dataset.classes
    assert dataset.classes == BEANS_CLASSES


def test_scan_junk_only_class_is_empty(beans_dir: Path) -> None:
    junk_class = beans_dir / "train" / "only_junk"
    junk_class.mkdir()
    (junk_class / "Thumbs.db").write_bytes(b"\x00")

    report = scan(beans_dir).report

    assert report.empty_classes == ["train/only_junk"]
    assert report.junk == [str(junk_class / "Thumbs.db")]


def test_scan_missing_split_folder(beans_dir: Path) -> None:
    shutil.rmtree(beans_dir / "test")

    with pytest.raises(DatasetError) as excinfo:
        scan(beans_dir)

    message = str(excinfo.value)
    assert str(beans_dir) in message
    assert "'test'" in message
    assert "found: train" in message
    assert "<split>/<class>/<image>" in message


def test_scan_missing_dataset_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"

    with pytest.raises(DatasetError) as excinfo:
        scan(missing)

    assert str(missing) in str(excinfo.value)
    assert "check the path" in str(excinfo.value)


def test_scan_test_class_without_training(beans_dir: Path) -> None:
    orphan = beans_dir / "test" / "mosaic_virus"
    orphan.mkdir()
    shutil.copyfile(beans_dir / "test" / "healthy" / "healthy_test_0.jpg", orphan / "a.jpg")
    # The copy is also a within-split duplicate, so give it distinct bytes.
    with (orphan / "a.jpg").open("ab") as handle:
        handle.write(b"\x00")

    with pytest.raises(DatasetError) as excinfo:
        scan(beans_dir)

    assert "mosaic_virus" in str(excinfo.value)
    assert "needs a training folder" in str(excinfo.value)


def test_scan_no_training_classes(tmp_path: Path) -> None:
    (tmp_path / "ds" / "train").mkdir(parents=True)
    (tmp_path / "ds" / "test").mkdir()

    with pytest.raises(DatasetError, match="no class folders with images"):
        scan(tmp_path / "ds")


def test_scan_split_folder_aliases(beans_dir: Path) -> None:
    (beans_dir / "train").rename(beans_dir / "training")
    (beans_dir / "test").rename(beans_dir / "testing")

    dataset = scan(beans_dir)

    assert len(dataset.train) == 30
    assert len(dataset.test) == 12


def test_scan_unusual_class_names(beans_dir: Path) -> None:
    renames = {"angular_leaf_spot": "v1.2", "bean_rust": "bean rust", "healthy": "café"}
    for split in ("train", "test"):
        for old, new in renames.items():
            (beans_dir / split / old).rename(beans_dir / split / new)

    dataset = scan(beans_dir)

    assert sorted(dataset.classes) == sorted(renames.values())
    assert dataset.class_counts("train") == {name: 10 for name in dataset.classes}
    assert dataset.class_counts("test") == {name: 4 for name in dataset.classes}
    assert {record.label for record in dataset.train} == set(renames.values())


def test_resolve_dataset_path_beats_mirror(tmp_path: Path) -> None:
    own_folder = tmp_path / "my_beans"

    source = resolve_source("beans", datasets_dir=MINI_DIR, dataset_paths={"beans": str(own_folder)})

    assert source == DatasetSource("beans", "folder", str(own_folder.resolve()))


def test_resolve_mirror_folder() -> None:
    source = resolve_source("xrays", datasets_dir=MINI_DIR)

    assert source.kind == "mirror"
    assert source.location == str((MINI_DIR / "xrays").resolve())


def test_resolve_mirror_lacks_dataset() -> None:
    with pytest.raises(DatasetError) as excinfo:
        resolve_source("food", datasets_dir=MINI_DIR)

    message = str(excinfo.value)
    assert "'food'" in message
    assert "it holds: beans, xrays" in message
    assert DATASETS_DIR_ENV in message


def test_resolve_empty_mirror(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="it holds: nothing"):
        resolve_source("beans", datasets_dir=tmp_path)


def test_resolve_missing_mirror(tmp_path: Path) -> None:
    missing = tmp_path / "no_mirror"

    with pytest.raises(DatasetError) as excinfo:
        resolve_source("beans", datasets_dir=missing)

    assert str(missing) in str(excinfo.value)
    assert "does not exist" in str(excinfo.value)


@pytest.mark.parametrize("key", ["clothing", "intel"])
def test_resolve_no_hub_copy(key: str) -> None:
    with pytest.raises(DatasetError) as excinfo:
        resolve_source(key)

    assert repr(key) in str(excinfo.value)
    assert f"--dataset-path {key}=PATH" in str(excinfo.value)


def test_resolve_hub_source() -> None:
    source = resolve_source("beans")

    assert source == DatasetSource("beans", "hub", "AI-Lab-Makerere/beans")


def test_resolve_unknown_key() -> None:
    with pytest.raises(ConfigError) as excinfo:
        resolve_source("mnist", datasets_dir=MINI_DIR)

    assert "'mnist'" in str(excinfo.value)
    assert "beans, cars, clothing, food, intel, pets, xrays" in str(excinfo.value)


def test_load_dataset_from_mirror(tmp_path: Path) -> None:
    shutil.copytree(MINI_DIR / "beans", tmp_path / "mirror" / "beans")
    source = resolve_source("beans", datasets_dir=tmp_path / "mirror")

    dataset = load_dataset(source)

    assert dataset.key == "beans"
    assert dataset.source == source.describe()
    assert len(dataset.train) == 30


def test_parse_dataset_paths_valid() -> None:
    parsed = parse_dataset_paths(["beans=/data/beans", "intel=relative/intel=v2"])

    assert parsed == {"beans": "/data/beans", "intel": "relative/intel=v2"}


def test_parse_dataset_paths_empty_list() -> None:
    assert parse_dataset_paths([]) == {}


@pytest.mark.parametrize("value", ["beans", "beans=", "=/data/beans", "Beans=/data", "bean s=/data"])
def test_parse_dataset_paths_invalid(value: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_dataset_paths([value])

    assert repr(value) in str(excinfo.value)
    assert "KEY=PATH" in str(excinfo.value)


def test_parse_dataset_paths_unknown_key() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        parse_dataset_paths(["mnist=/data/mnist"])


def test_registry_has_seven_datasets() -> None:
    assert sorted(REGISTRY) == ["beans", "cars", "clothing", "food", "intel", "pets", "xrays"]


def test_registry_keys_match_specs() -> None:
    for key, spec in REGISTRY.items():
        assert spec.key == key
        assert get_spec(key) is spec


def test_registry_hubless_datasets_explain() -> None:
    for spec in REGISTRY.values():
        if spec.hub_id is None:
            assert "--dataset-path" in spec.note, spec.key


def test_label_conflict_drops_both_copies(tmp_path):
    """The same image under two class labels is a conflict: both copies leave the pool."""
    from PIL import Image as PILImage

    root = tmp_path / "conflict"
    for split, count in (("train", 3), ("test", 1)):
        for label, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                PILImage.new("RGB", (8, 8), (colour[0], colour[1] + index + (10 if split == "test" else 0), 5)).save(
                    folder / f"{index}.png")
    shared = root / "train" / "cat" / "0.png"
    (root / "train" / "dog" / "shared.png").write_bytes(shared.read_bytes())

    dataset = scan_folder(root, key="conflict", source="test")

    assert dataset.report.counts()["label_conflicts"] == 1
    assert "class 'dog'" in dataset.report.label_conflicts[0]
    assert "class 'cat'" in dataset.report.label_conflicts[0]
    assert all(record.path != shared for record in dataset.train)
    assert dataset.class_counts("train") == {"cat": 2, "dog": 3}
