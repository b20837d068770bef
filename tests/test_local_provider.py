"""The local provider's training and its HTTP endpoint, on real sample images."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import requests

from imgbench.ablation import plan_ablation
from imgbench.datasets import scan_folder
from imgbench.errors import ConfigError, InvalidInputError
from providers import TrainingSet
from providers.local import LocalOptions, LocalProvider


@pytest.fixture(scope="module")
def beans(mini_datasets: Path):
    return scan_folder(mini_datasets / "beans", key="beans", source="test")


@pytest.fixture(scope="module")
def deployed(beans, shared_cache_dir: Path):
    provider = LocalProvider(LocalOptions(cache_dir=shared_cache_dir))
    plan = plan_ablation(beans, 10)
    model = provider.train(provider.upload(TrainingSet("local-beans-10", plan.classes, plan.images)))
    endpoint = provider.deploy(model)
    yield provider, model, endpoint
    provider.teardown()


def test_health_lists_classes(deployed, beans):
    _, _, endpoint = deployed
    response = requests.get(f"{endpoint.url}/health", timeout=10)
    assert response.status_code == 200
    assert response.json()["classes"] == beans.classes


def test_endpoint_listens_on_loopback(deployed):
    _, _, endpoint = deployed
    assert endpoint.url.startswith("http://127.0.0.1:")


def test_predict_returns_known_label(deployed, beans):
    provider, _, endpoint = deployed
    with requests.Session() as session:
        prediction = provider.invoke(endpoint, beans.test[0].read_bytes(), session)
    assert prediction.label in beans.classes
    assert 0.0 < prediction.confidence <= 1.0


def test_predict_scores_sum_to_one(deployed, beans):
    _, _, endpoint = deployed
    response = requests.post(f"{endpoint.url}/predict", data=beans.test[1].read_bytes(), timeout=30)
    scores = response.json()["scores"]
    assert sorted(scores) == sorted(beans.classes)
    assert abs(sum(scores.values()) - 1.0) < 1e-6


def test_garbage_body_rejected(deployed):
    provider, _, endpoint = deployed
    with requests.Session() as session, pytest.raises(InvalidInputError, match="not an image"):
        provider.invoke(endpoint, b"this is not an image", session)


def test_empty_body_rejected(deployed):
    _, _, endpoint = deployed
    response = requests.post(f"{endpoint.url}/predict", data=b"", timeout=10)
    assert response.status_code == 400
    assert "Content-Length" in response.json()["error"]


def test_unknown_path_is_404(deployed):
    _, _, endpoint = deployed
    assert requests.get(f"{endpoint.url}/nothing", timeout=10).status_code == 404


def test_http_prediction_matches_in_process(deployed, beans):
    """The endpoint must give the same label as the classifier applied directly."""
    provider, model, endpoint = deployed
    items = [(record.sha256, record.read_bytes(), str(record.path)) for record in beans.test]
    expected = provider.predict_local(model, items)
    with requests.Session() as session:
        served = [provider.invoke(endpoint, data, session).label for _, data, _ in items]
    assert served == list(expected)


def test_cache_reused_across_ablations(beans, tmp_path):
    provider = LocalProvider(LocalOptions(cache_dir=tmp_path))
    small, large = plan_ablation(beans, 5), plan_ablation(beans, 10)
    first = provider.train(provider.upload(TrainingSet("a", small.classes, small.images)))
    second = provider.train(provider.upload(TrainingSet("b", large.classes, large.images)))
    assert first.embedded == 12
    assert second.from_cache == 12
    assert second.embedded == 24 - 12


def test_teardown_stops_server(beans, shared_cache_dir):
    provider = LocalProvider(LocalOptions(cache_dir=shared_cache_dir))
    plan = plan_ablation(beans, 5)
    endpoint = provider.deploy(provider.train(provider.upload(TrainingSet("t", plan.classes, plan.images))))
    port = int(endpoint.url.rsplit(":", 1)[1])
    provider.teardown()
    provider.teardown()
    assert endpoint.process.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_invalid_regularization_rejected():
    with pytest.raises(ConfigError, match="regularization_c"):
        LocalOptions(regularization_c=0)


def test_unknown_mode_rejected():
    with pytest.raises(ConfigError, match="valid modes: auto, linear, ridge, ridge-flip"):
        LocalOptions(mode="fine-tune")


def test_missing_credentials_named(monkeypatch):
    from imgbench.errors import MissingCredentialsError

    class NeedsKey(LocalProvider):
        credential_env = ("ACME_API_KEY",)

    with pytest.raises(MissingCredentialsError, match="ACME_API_KEY"):
        NeedsKey().check_ready()


def test_concurrent_requests_share_batches(deployed, beans):
    """Concurrent requests must be served by fewer forward passes than requests."""
    from concurrent.futures import ThreadPoolExecutor

    provider, _, endpoint = deployed
    before = requests.get(f"{endpoint.url}/health", timeout=10).json()
    images = [record.read_bytes() for record in beans.test] * 2

    def send(image):
        with requests.Session() as session:
            return provider.invoke(endpoint, image, session).label

    with ThreadPoolExecutor(max_workers=8) as pool:
        labels = list(pool.map(send, images))
    after = requests.get(f"{endpoint.url}/health", timeout=10).json()
    assert len(labels) == len(images)
    assert after["images"] - before["images"] == len(images)
    assert after["batches"] - before["batches"] < len(images)


def test_teardown_after_interrupted_deploy(beans, shared_cache_dir, monkeypatch):
    """A deploy interrupted while waiting leaves nothing behind once teardown runs."""
    provider = LocalProvider(LocalOptions(cache_dir=shared_cache_dir))
    plan = plan_ablation(beans, 5)
    model = provider.train(provider.upload(TrainingSet("t", plan.classes, plan.images)))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(provider, "_read_url", interrupted)
    with pytest.raises(KeyboardInterrupt):
        provider.deploy(model)
    endpoint = provider._endpoints[0]
    provider.teardown()
    assert endpoint.process.poll() is not None
    assert not endpoint.workdir.exists()
