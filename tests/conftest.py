"""Shared fixtures of the test suite: sample data, caches, and a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MINI_DATASETS = Path(__file__).resolve().parent / "data" / "mini"

# Credentials of every supported service. Tests never see real ones.
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "NYCKEL_CLIENT_ID", "NYCKEL_CLIENT_SECRET",
)


# AWS settings that would point boto3 at a real account's files or region.
AWS_CONFIG_VARIABLES = (
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_REKOGNITION",
    "AWS_CA_BUNDLE", "IMGBENCH_AWS_BUCKET", "IMGBENCH_AWS_PREFIX", "IMGBENCH_AWS_REGION", "IMGBENCH_AWS_URL",
)


# Google Cloud settings that would point the SDKs at a real project, a real
# credential file or another endpoint.
GOOGLE_VARIABLES = (
    "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "GOOGLE_CLOUD_QUOTA_PROJECT", "GOOGLE_API_KEY",
    "STORAGE_EMULATOR_HOST", "IMGBENCH_VERTEX_PROJECT", "IMGBENCH_VERTEX_BUCKET", "IMGBENCH_VERTEX_LOCATION",
    "IMGBENCH_VERTEX_PREFIX", "IMGBENCH_VERTEX_BUDGET_MILLI_NODE_HOURS", "IMGBENCH_VERTEX_URL",
)


# Hugging Face Hub settings that would point huggingface_hub at another service or token file.
HUGGINGFACE_VARIABLES = ("HF_ENDPOINT", "HF_TOKEN_PATH", "HF_INFERENCE_ENDPOINT")


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in CREDENTIAL_VARIABLES + AWS_CONFIG_VARIABLES + HUGGINGFACE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # boto3 reads these files even with explicit credentials; point it at empty ones.
    aws_dir = tmp_path_factory.getbasetemp() / "aws-config"
    aws_dir.mkdir(exist_ok=True)
    for variable, name in (("AWS_CONFIG_FILE", "config"), ("AWS_SHARED_CREDENTIALS_FILE", "credentials")):
        path = aws_dir / name
        path.touch()
        monkeypatch.setenv(variable, str(path))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    isolate_huggingface_home(monkeypatch, tmp_path_factory.getbasetemp() / "hf-home")


def isolate_huggingface_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point HF_HOME and huggingface_hub's token paths at an empty folder, so no real token file is read."""
    monkeypatch.setenv("HF_HOME", str(home))
    if "huggingface_hub.constants" in sys.modules:
        constants = sys.modules["huggingface_hub.constants"]
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


@pytest.fixture(scope="session")
def empty_gcloud_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gcloud-config")


@pytest.fixture(autouse=True)
def no_google_credentials(monkeypatch: pytest.MonkeyPatch, empty_gcloud_config: Path) -> None:
    """Keep Application Default Credentials away from real files and the metadata server."""
    for name in GOOGLE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # google-auth looks for application_default_credentials.json in this folder.
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(empty_gcloud_config))
    # google-auth skips its metadata-server probe when this is "true", but reads it
    # only when google.auth.compute_engine._metadata is first imported.
    monkeypatch.setenv("NO_GCE_CHECK", "true")


@pytest.fixture(scope="session")
def mini_datasets() -> Path:
    """An offline mirror holding small real samples of beans and xrays."""
    return MINI_DATASETS


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedding cache for the whole session, so each image is embedded once."""
    return tmp_path_factory.mktemp("imgbench-cache")


def run_benchmark(args: list[str], cache_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``pytest bench_tests`` in a fresh process, as a user would."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in CREDENTIAL_VARIABLES and not key.startswith("PYTEST_")}
    environment["IMGBENCH_CACHE_DIR"] = str(cache_dir)
    environment.pop("IMGBENCH_DATASETS_DIR", None)
    command = [sys.executable, "-m", "pytest", "bench_tests", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout, check=False)
