"""The bad-input corpus end to end: odd files and class names through a benchmark run, and broken options.

``tests/test_images.py`` and ``tests/test_datasets.py`` check each bad file
against the decoder and the scanner; here the same kinds of file sit in one
dataset folder that a whole Nyckel case runs on against the emulator, and
the tests check what reaches the service and what the record says.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgbench.clock import ReplayClock
from imgbench.emulators.nyckel import NyckelEmulator
from imgbench.errors import InvalidInputError
from imgbench.images import CONVERSION_POLICY
from imgbench.labels import safe_labels
from providers.nyckel import NyckelOptions, NyckelProvider
from tests.benchrun import bench_environment
from tests.conftest import MINI_DATASETS, REPO_ROOT

ODD_CLASSES = {"angular_leaf_spot": "angular leaf.spot", "bean_rust": "bean rüst", "healthy": "healthy"}


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(1, (0, 0, 16, 32))
    return png_bytes(image, transparency=0)


def gray16_gradient() -> bytes:
    """A 16-bit grayscale PNG whose values span 1000..4000, well inside the 16-bit range."""
    pixels = np.tile(np.linspace(1000, 4000, 64, dtype=np.uint16), (16, 1))
    return png_bytes(Image.fromarray(pixels))


def decoded_payload(uri: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    image.load()
    return image


@pytest.fixture
def provider():
    return NyckelProvider(NyckelOptions(base_url="http://127.0.0.1:9"), run_mode="emulator", client_id="x",
                          client_secret="y", clock=ReplayClock())


def test_palette_transparency_sent_on_white(provider):
    sent = decoded_payload(provider._prepare(palette_with_transparency(), "palette.png"))

    assert sent.mode == "RGB"
    assert np.asarray(sent)[:, 24].mean(axis=0) == pytest.approx([255, 255, 255], abs=3)
    assert np.asarray(sent)[:, 4].mean(axis=0) == pytest.approx([200, 30, 30], abs=12)


def test_gray16_sent_rescaled_not_clipped(provider):
    sent = np.asarray(decoded_payload(provider._prepare(gray16_gradient(), "gray16.png")).convert("L"))

    assert sent[:, 0].mean() < 10
    assert sent[:, -1].mean() > 245
    assert np.all(np.diff(sent[8].astype(int)) >= -3)  # the gradient keeps its order


def test_truncated_image_is_invalid_input(provider):
    data = (MINI_DATASETS / "beans" / "test" / "healthy" / "healthy_test_0.jpg").read_bytes()

    with pytest.raises(InvalidInputError, match="truncated.jpg"):
        provider._prepare(data[: len(data) // 2], "truncated.jpg")


def test_policy_recorded_in_settings(provider):
    assert CONVERSION_POLICY in provider.settings()["image_policy"]


@pytest.mark.parametrize(("names", "collide"), [
    (("leaf spot", "leaf.spot"), ("leaf spot", "leaf.spot")),
    (("café", "cafe"), ("café", "cafe")),
    (("a b", "a_b", "c"), ("a b", "a_b")),
])
def test_colliding_class_names_named(names, collide):
    with pytest.raises(InvalidInputError) as caught:
        safe_labels(names, service="Example")

    assert all(repr(name) in str(caught.value) for name in collide)
    assert "rename one of the class folders" in str(caught.value)


def messy_dataset(root: Path) -> Path:
    """Copy part of the mini beans set under odd class names, with bad files and odd formats beside it."""
    for split, count in (("train", 8), ("test", 2)):
        for source_class, target_class in ODD_CLASSES.items():
            target = root / split / target_class
            target.mkdir(parents=True)
            for path in sorted((MINI_DATASETS / "beans" / split / source_class).glob("*.jpg"))[:count]:
                shutil.copy(path, target / path.name)
    train = root / "train" / "healthy"
    sample = (train / sorted(p.name for p in train.iterdir())[0]).read_bytes()
    (train / "truncated.jpg").write_bytes(sample[: len(sample) // 3])
    (train / "empty.jpg").write_bytes(b"")
    (train / "notes.jpg").write_text("not an image\n")
    (train / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "palette.png").write_bytes(palette_with_transparency())
    (train / "gray16.png").write_bytes(gray16_gradient())
    (root / "train" / "empty class").mkdir()
    shutil.copy(next((root / "test" / "healthy").iterdir()), train / "copy_of_test.jpg")
    return root


@pytest.mark.slow
def test_messy_dataset_runs_with_recorded_problems(tmp_path, shared_cache_dir):
    import subprocess
    import sys

    dataset = messy_dataset(tmp_path / "beans")
    results = tmp_path / "results.json"
    with NyckelEmulator(training_polls=2) as emulator:
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", "bench_tests", "-p", "no:cacheprovider", "--providers", "nyckel",
             "--nyckel-url", emulator.url, "--dataset-path", f"beans={dataset}", "--datasets", "beans",
             "--ablations", "5", "--load-requests", "5", "--results", str(results)],
            cwd=REPO_ROOT, env=bench_environment(shared_cache_dir), capture_output=True, text=True, timeout=300,
            check=False)

    assert completed.returncode == 0, completed.stdout[-3000:]
    document = json.loads(results.read_text())
    [record] = [entry["extra_info"] for entry in document["benchmarks"]]
    scan = record["dataset_scan"]
    assert scan["undecodable"] == 3
    assert scan["junk"] == 1
    assert scan["empty_classes"] == 1
    assert scan["train_test_duplicates"] == 1
    assert sorted(record["classes"]) == sorted(ODD_CLASSES.values())
    assert CONVERSION_POLICY in record["provider_settings"]["image_policy"]
    assert emulator.functions == {}


@pytest.mark.parametrize(("options", "message"), [
    (["--provider-option", "nyckel.colour=red"], "unknown nyckel setting(s) colour"),
    (["--provider-option", "nyckel-colour"], "use PROVIDER.KEY=VALUE"),
    (["--ablations", "five"], "invalid ablation 'five'"),
    (["--max-cost", "-1"], "invalid --max-cost"),
    (["--providers", "nyckel", "--nyckel-url", "127.0.0.1:8765"], "invalid nyckel service URL"),
    (["--datasets", "imagenet"], "unknown dataset(s) imagenet"),
])
def test_broken_options_rejected(options, message, shared_cache_dir, tmp_path):
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-m", "pytest", "bench_tests", "-p", "no:cacheprovider",
                                "--collect-only", "--results", str(tmp_path / "r.json"), *options],
                               cwd=REPO_ROOT, env=bench_environment(shared_cache_dir), capture_output=True,
                               text=True, timeout=120, check=False)

    assert completed.returncode == 4, completed.stdout[-2000:]
    assert message in completed.stderr
