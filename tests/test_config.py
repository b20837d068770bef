"""Tests of imgbench.config: option parsing, defaults and the case matrix."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgbench.config import (
    BenchConfig,
    CaseSpec,
    build_config,
    parse_ablations,
    parse_datasets,
    parse_provider_options,
    parse_providers,
)
from imgbench.datasets import DATASETS_DIR_ENV
from imgbench.errors import ConfigError
from imgbench.loadgen import LoadConfig
from providers import provider_names

ALL_DATASETS = "beans, cars, clothing, food, intel, pets, xrays"


def make_config(**overrides) -> BenchConfig:
    """Call ``build_config`` with the command line's defaults, changed by ``overrides``."""
    options = {
        "providers": None,
        "datasets": None,
        "ablations": None,
        "datasets_dir": None,
        "dataset_paths": {},
        "results": None,
        "run_id": None,
        "load_requests": 1000,
        "load_concurrency": 10,
        "load_max_seconds": 600.0,
        "seed": "imgbench-2023",
        "cache_dir": None,
    }
    options.update(overrides)
    return build_config(**options)


@pytest.fixture(autouse=True)
def no_datasets_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's own mirror setting out of the defaults under test."""
    monkeypatch.delenv(DATASETS_DIR_ENV, raising=False)


def test_defaults() -> None:
    config = make_config()

    assert config.providers == ("local",)
    assert config.datasets == ("beans", "xrays")
    assert config.ablations == (5, 20, 80, 320, 1280)
    assert config.datasets_dir is None
    assert config.cache_dir is None


def test_default_results_path_uses_run_id() -> None:
    config = make_config(run_id="20240101T000000Z-abc123")

    assert config.run_id == "20240101T000000Z-abc123"
    assert config.results_path == Path("results") / "imgbench-20240101T000000Z-abc123.json"


def test_new_run_ids_differ() -> None:
    assert make_config().run_id != make_config().run_id


def test_explicit_values_parsed() -> None:
    config = make_config(providers="local", datasets=" xrays , beans ", ablations="20,5",
                         results="out/run.json", load_requests=50, load_concurrency=4,
                         load_max_seconds=30.0)

    assert config.providers == ("local",)
    assert config.datasets == ("xrays", "beans")
    assert config.ablations == (20, 5)
    assert config.results_path == Path("out/run.json")
    assert config.load == LoadConfig(requests=50, concurrency=4, max_seconds=30.0)


def test_datasets_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATASETS_DIR_ENV, str(tmp_path))

    assert make_config().datasets_dir == str(tmp_path)


def test_datasets_dir_option_beats_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATASETS_DIR_ENV, str(tmp_path / "from_env"))

    config = make_config(datasets_dir=str(tmp_path / "from_option"))

    assert config.datasets_dir == str(tmp_path / "from_option")


def test_cache_dir_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))

    assert make_config(cache_dir="~/imgbench-cache").cache_dir == tmp_path / "imgbench-cache"


def test_unknown_provider_lists_valid() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_providers("local,rekognition")

    assert "rekognition" in str(excinfo.value)
    assert f"valid providers: {', '.join(provider_names())}" in str(excinfo.value)


def test_unknown_dataset_lists_valid() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_datasets("beans,mnist")

    assert "mnist" in str(excinfo.value)
    assert f"valid datasets: {ALL_DATASETS}" in str(excinfo.value)


@pytest.mark.parametrize("value", ["5,7", "0", "-5", "twenty"])
def test_invalid_ablation_lists_standard(value: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_ablations(value)

    assert "invalid ablation" in str(excinfo.value)
    assert "5,20,80,320,1280" in str(excinfo.value).replace(", ", ",")


@pytest.mark.parametrize("parse", [parse_providers, parse_datasets, parse_ablations])
@pytest.mark.parametrize("value", ["", " ", ",", " , ,"])
def test_empty_list_rejected(parse, value: str) -> None:
    with pytest.raises(ConfigError, match="is empty"):
        parse(value)


@pytest.mark.parametrize("option", ["providers", "datasets", "ablations"])
def test_build_rejects_empty_option(option: str) -> None:
    # An explicitly empty option, such as --datasets=, is an error and does
    # not fall back to the defaults.
    with pytest.raises(ConfigError, match=f"--{option} is empty"):
        make_config(**{option: ""})


def test_build_rejects_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="valid datasets"):
        make_config(datasets="beans,imagenet")


def test_case_id_format() -> None:
    assert CaseSpec("local", "beans", 20).case_id == "local-beans-20"


def test_cases_cover_matrix() -> None:
    config = make_config(datasets="beans,xrays", ablations="5,20")

    assert [case.case_id for case in config.cases()] == [
        "local-beans-5", "local-beans-20", "local-xrays-5", "local-xrays-20",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"requests": 0}, "request count 0"),
        ({"concurrency": 0}, "concurrency 0"),
        ({"requests": -3}, "request count -3"),
        ({"max_seconds": 0}, "time limit 0"),
    ],
)
def test_load_config_rejects_invalid(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoadConfig(**options)


def test_build_rejects_zero_concurrency() -> None:
    with pytest.raises(ConfigError, match="concurrency 0"):
        make_config(load_concurrency=0)


def test_provider_option_parsed_by_provider():
    from imgbench.config import parse_provider_options

    assert parse_provider_options(["nyckel.a=1", "nyckel.b=x=y"]) == {"nyckel": {"a": "1", "b": "x=y"}}


@pytest.mark.parametrize("item", ["nyckel", "nyckel.a", ".a=1", "nyckel.=1"])
def test_provider_option_malformed(item):
    from imgbench.config import parse_provider_options

    with pytest.raises(ConfigError, match="PROVIDER.KEY=VALUE"):
        parse_provider_options([item])


def test_provider_option_unknown_provider():
    from imgbench.config import parse_provider_options

    with pytest.raises(ConfigError, match="unknown provider 'nope'.*valid providers: .*nyckel"):
        parse_provider_options(["nope.a=1"])


def test_provider_option_unknown_key():
    from imgbench.config import check_provider_options

    with pytest.raises(ConfigError, match="unknown nyckel setting.*colour.*valid keys"):
        check_provider_options({"nyckel": {"colour": "red"}})


@pytest.mark.parametrize("option", ["aws.inference_units=abc", "vertex.budget_milli_node_hours=x",
                                    "huggingface.epochs=x", "local.mode=fastest"])
def test_invalid_provider_value_fails_at_start(option, tmp_path):
    from imgbench.pytest_plugin import check_run_settings

    provider = option.split(".")[0]
    config = build_config(providers=provider, datasets="beans", ablations="5", datasets_dir=None,
                          dataset_paths={}, results=str(tmp_path / "r.json"), run_id="start", load_requests=10,
                          load_concurrency=2, load_max_seconds=60, seed="s", cache_dir=str(tmp_path / "cache"),
                          provider_options=parse_provider_options([option]))

    with pytest.raises(ConfigError, match=option.split("=")[1]):
        check_run_settings(config)
