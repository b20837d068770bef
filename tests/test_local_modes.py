"""The local provider's training modes: determinism, settings and the linear head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgbench.ablation import plan_ablation
from imgbench.config import build_config
from imgbench.datasets import scan_folder
from imgbench.errors import ConfigError
from imgbench.local_head import HeadRecipe, LinearHead
from providers import TrainingSet
from providers.local import AUTO_FLIP_MAX_IMAGES, DEFAULT_MODE, MODE_NAMES, LocalOptions, LocalProvider


@pytest.fixture(scope="module")
def beans(mini_datasets: Path):
    return scan_folder(mini_datasets / "beans", key="beans", source="test")


def bench_config(provider_options: dict[str, dict[str, str]] | None = None):
    return build_config(providers="local", datasets=None, ablations=None, datasets_dir=None, dataset_paths={},
                        results=None, run_id=None, load_requests=10, load_concurrency=1, load_max_seconds=60.0,
                        seed="imgbench-2023", cache_dir=None, provider_options=provider_options)


def train(beans, cache_dir: Path, mode: str, seed: int = 0):
    provider = LocalProvider(LocalOptions(mode=mode, seed=seed, cache_dir=cache_dir))
    plan = plan_ablation(beans, 10)
    try:
        model = provider.train(provider.upload(TrainingSet(f"local-beans-10-{mode}", plan.classes, plan.images)))
    finally:
        provider.teardown()
    items = [(record.sha256, record.read_bytes(), str(record.path)) for record in beans.test]
    return model, model.head.predict_proba(model.mode.embed(items, cache_dir)[0])


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_training_deterministic_per_mode(beans, shared_cache_dir, mode):
    first, first_probabilities = train(beans, shared_cache_dir, mode)
    second, second_probabilities = train(beans, shared_cache_dir, mode)
    assert first.chosen_c == second.chosen_c
    assert first.head.cv_accuracy == second.head.cv_accuracy
    np.testing.assert_array_equal(first.head._model.coef_, second.head._model.coef_)
    np.testing.assert_array_equal(first.head._model.intercept_, second.head._model.intercept_)
    np.testing.assert_array_equal(first_probabilities, second_probabilities)


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_cached_and_fresh_embeddings_agree(beans, shared_cache_dir, tmp_path, mode):
    """A model trained on cached embeddings predicts as one trained on freshly computed ones."""
    _, cached = train(beans, shared_cache_dir, mode)
    _, fresh = train(beans, tmp_path, mode)
    np.testing.assert_allclose(cached, fresh, atol=1e-5)


def test_default_mode_is_listed():
    assert DEFAULT_MODE in MODE_NAMES
    assert LocalProvider().settings()["mode"] == DEFAULT_MODE


def test_auto_mode_flips_small_sets_only():
    options = LocalOptions(mode="auto")
    assert options.training_mode(AUTO_FLIP_MAX_IMAGES).recipe.flip == "tta"
    assert options.training_mode(AUTO_FLIP_MAX_IMAGES + 1).recipe.flip == "none"


def test_auto_mode_recorded_on_model(beans, shared_cache_dir):
    model, _ = train(beans, shared_cache_dir, "auto")
    provider = LocalProvider(LocalOptions(cache_dir=shared_cache_dir))
    description = provider.describe_model(model)
    assert description["mode"] == "ridge-flip"
    assert description["flip"] == "tta"
    assert str(description["chosen_c"]) in description["cv_accuracy"]


def test_mode_from_provider_option(monkeypatch):
    monkeypatch.setenv("IMGBENCH_LOCAL_MODE", "ridge")
    provider = LocalProvider.from_config(bench_config({"local": {"mode": "linear"}}))
    assert provider.settings()["mode"] == "linear"


def test_mode_from_environment(monkeypatch):
    monkeypatch.setenv("IMGBENCH_LOCAL_MODE", "ridge-flip")
    settings = LocalProvider.from_config(bench_config()).settings()
    assert settings["mode"] == "ridge-flip"
    assert settings["flip"] == "tta"


def test_unknown_mode_from_environment(monkeypatch):
    monkeypatch.setenv("IMGBENCH_LOCAL_MODE", "nope")
    with pytest.raises(ConfigError, match="invalid local mode 'nope'.*valid modes"):
        LocalProvider.from_config(bench_config())


def test_c_and_image_size_override_mode(monkeypatch):
    monkeypatch.setenv("IMGBENCH_LOCAL_C", "0.5")
    provider = LocalProvider.from_config(bench_config({"local": {"image_size": "224"}}))
    settings = provider.settings()
    assert settings["c_values"] == [0.5]
    assert set(settings["image_sizes"]) == {224}


def test_invalid_c_option_named():
    with pytest.raises(ConfigError, match="IMGBENCH_LOCAL_C"):
        LocalProvider.from_config(bench_config({"local": {"c": "-1"}}))


def test_unknown_option_key_rejected():
    with pytest.raises(ConfigError, match="unknown local setting"):
        bench_config({"local": {"colour": "red"}})


@pytest.mark.parametrize("classifier", ["logistic", "ridge"])
@pytest.mark.parametrize("flip", ["none", "tta", "augment"])
def test_head_separates_clusters(classifier, flip):
    """Every recipe learns two well separated clusters, whichever C cross-validation picks."""
    generator = np.random.default_rng(0)
    labels = np.array(["a"] * 20 + ["b"] * 20)
    centres = np.where(labels[:, None] == "a", 0.0, 3.0)
    plain = centres + generator.normal(size=(40, 8))
    mirrored = centres + generator.normal(size=(40, 8))
    recipe = HeadRecipe("standardise", flip, classifier, (0.01, 0.1, 1.0))
    views = [plain, mirrored][:recipe.views]
    head = LinearHead(recipe).fit(views, labels)
    assert head.chosen_c in recipe.c_values
    assert set(head.cv_accuracy) == set(recipe.c_values)
    assert np.mean(head.predict(views) == labels) >= 0.95
    np.testing.assert_allclose(head.predict_proba(views).sum(axis=1), 1.0)


def test_head_rejects_wrong_view_count():
    head = LinearHead(HeadRecipe(flip="tta")).fit([np.eye(4), np.eye(4)], ["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="needs 2 views, got 1"):
        head.predict([np.eye(4)])


def test_recipe_rejects_unknown_values():
    with pytest.raises(ConfigError, match="unknown classifier"):
        HeadRecipe(classifier="forest")
    with pytest.raises(ConfigError, match="invalid c_values"):
        HeadRecipe(c_values=())


def test_ridge_two_classes_scored_by_accuracy():
    """With two classes, leave-one-out must rank C by the images' own accuracy.

    A vanishing C leaves only the intercept, whose left-out prediction always
    favours the other class of a balanced set, so it must not be chosen.
    """
    generator = np.random.default_rng(1)
    labels = np.array(["a"] * 15 + ["b"] * 15)
    features = np.where(labels[:, None] == "a", 0.0, 2.0) + generator.normal(size=(30, 6))
    head = LinearHead(HeadRecipe("none", "none", "ridge", (1e-9, 1.0))).fit([features], labels)
    assert head.cv_accuracy[1e-9] < 0.5
    assert head.cv_accuracy[1.0] > 0.8
    assert head.chosen_c == 1.0
