"""Tests of the cost estimate and --max-cost against the providers' price data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.cases import check_budget
from imgbench.config import BenchConfig, CaseSpec
from imgbench.costs import (DATASET_SIZES, EXPECTED_DURATIONS, estimate_case, estimate_matrix, over_budget_reason,
                            recorded_spend, unenforceable_reason)
from imgbench.emulators.nyckel import NyckelEmulator
from imgbench.loadgen import LoadConfig
from providers import get_provider_class, provider_names
from providers.base import PriceModel
from tests.benchrun import run_benchmark_against
from tests.conftest import REPO_ROOT, run_benchmark

CONFIG = BenchConfig(providers=("nyckel",), datasets=("beans",), ablations=(5, 20),
                     load=LoadConfig(requests=100, concurrency=4, warmup=10))


def test_price_data_names_its_source():
    for name in provider_names():
        provider = get_provider_class(name)
        if provider.mode == "local":
            assert provider.price_model is None
            continue
        assert name in EXPECTED_DURATIONS, name
        assert EXPECTED_DURATIONS[name].source.startswith("estimate"), name
        prices = provider.price_model
        if prices is None:
            continue
        assert isinstance(prices, PriceModel), name
        assert prices.source.startswith("https://"), name
        assert prices.retrieved, name


def test_unpriced_provider_cost_is_unknown(monkeypatch):
    monkeypatch.setattr(get_provider_class("nyckel"), "price_model", None)

    estimate = estimate_matrix(CONFIG)

    assert estimate.unpriced_providers() == ["nyckel"]
    assert all(not case.prices_known for case in estimate.cases)
    assert all(case.training_hours > 0 and case.requests > 0 for case in estimate.cases)
    assert estimate.total_usd == 0.0
    assert "no price data for nyckel" in estimate.format()


def test_max_cost_needs_prices_of_live_providers(monkeypatch):
    monkeypatch.setattr(get_provider_class("nyckel"), "price_model", None)
    estimate = estimate_matrix(CONFIG)

    reason = unenforceable_reason(estimate, {"nyckel": "live"})

    assert reason is not None
    assert "no price data for nyckel" in reason
    assert unenforceable_reason(estimate, {"nyckel": "replay"}) is None


def test_local_provider_cost_is_known_zero():
    config = BenchConfig(providers=("local",), datasets=("beans",), ablations=(5,))

    estimate = estimate_matrix(config)

    assert estimate.unpriced_providers() == []
    assert estimate.total_usd == 0.0


def test_nyckel_estimate_from_price_data():
    prices = get_provider_class("nyckel").price_model
    test_images, _ = DATASET_SIZES["beans"]

    estimate = estimate_case(CaseSpec("nyckel", "beans", 5), CONFIG)

    assert estimate.requests == test_images + 100 + 10
    assert estimate.requests_usd == pytest.approx(estimate.requests / 1000 * prices.per_1000_requests)
    assert estimate.training_usd == 0.0
    assert estimate.total_usd == pytest.approx(estimate.requests_usd)
    assert estimate.prices_verified is prices.verified


def test_hourly_prices_multiply_durations(monkeypatch):
    prices = PriceModel("USD", training_per_hour=10.0, endpoint_per_hour=2.0, per_1000_requests=1.0,
                        storage_per_gb_month=None, source="https://example.invalid/prices", retrieved="2026-01-01")
    monkeypatch.setattr(get_provider_class("nyckel"), "price_model", prices)
    durations = EXPECTED_DURATIONS["nyckel"]

    estimate = estimate_case(CaseSpec("nyckel", "beans", 20), CONFIG)

    training_hours = durations.training_hours_base + durations.training_hours_per_1000_images * 60 / 1000
    assert estimate.training_hours == pytest.approx(training_hours)
    assert estimate.training_usd == pytest.approx(10.0 * training_hours)
    assert estimate.endpoint_usd == pytest.approx(2.0 * estimate.endpoint_hours)
    assert estimate.endpoint_hours > durations.deployment_hours


def test_matrix_total_and_skip():
    matrix = estimate_matrix(CONFIG)
    skipped = estimate_matrix(CONFIG, skip={"nyckel-beans-5"})

    assert matrix.total_usd == pytest.approx(sum(case.total_usd for case in matrix.cases))
    assert [case.case_id for case in skipped.cases] == ["nyckel-beans-20"]
    assert "unverified" in matrix.format()


def test_local_provider_free():
    config = BenchConfig(providers=("local",), datasets=("beans",), ablations=(5,))

    assert estimate_matrix(config).total_usd == 0.0


def test_over_budget_reason_names_figures():
    estimate = estimate_case(CaseSpec("nyckel", "beans", 5), CONFIG)

    assert over_budget_reason(10.0, 0.0, estimate) is None
    reason = over_budget_reason(estimate.total_usd + 0.5, 1.0, estimate)
    assert "spend so far 1.00 USD" in reason
    assert f"--max-cost {estimate.total_usd + 0.5:.2f} USD" in reason


def test_estimate_command_prints_total():
    completed = subprocess.run([sys.executable, "-m", "imgbench", "estimate", "--providers", "nyckel",
                                "--datasets", "beans", "--ablations", "5,20", "--load-requests", "100"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)

    assert completed.returncode == 0, completed.stderr
    assert "nyckel-beans-5" in completed.stdout
    assert "total" in completed.stdout


def test_estimate_command_rejects_unknown_provider():
    completed = subprocess.run([sys.executable, "-m", "imgbench", "estimate", "--providers", "nope"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)

    assert completed.returncode == 2
    assert "unknown provider(s) nope" in completed.stderr


def live_run_environment(cache_dir: Path) -> dict[str, str]:
    """Return an environment with dummy Nyckel credentials, for live runs that stop before any request."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    environment.update(IMGBENCH_CACHE_DIR=str(cache_dir), NYCKEL_CLIENT_ID="dummy-id", NYCKEL_CLIENT_SECRET="dummy")
    return environment


def test_max_cost_rejects_live_run(shared_cache_dir, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "bench_tests", "--live", "--providers", "nyckel", "--datasets", "beans",
         "--ablations", "5,20", "--max-cost", "0.01", "--collect-only", "--results", str(tmp_path / "r.json")],
        cwd=REPO_ROOT, env=live_run_environment(shared_cache_dir), capture_output=True, text=True, timeout=120,
        check=False)

    assert completed.returncode == 4
    assert "over --max-cost 0.01 USD" in completed.stderr
    assert "cost estimate is" in completed.stderr


def test_max_cost_ignores_replayed_run(shared_cache_dir, tmp_path):
    completed = run_benchmark(["--providers", "nyckel", "--datasets", "beans", "--ablations", "5,20",
                               "--max-cost", "0.01", "--collect-only", "--results", str(tmp_path / "r.json")],
                              shared_cache_dir, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert "this run is not live, so it costs nothing" in completed.stdout


def test_max_cost_prints_estimate(shared_cache_dir, tmp_path):
    completed = run_benchmark(["--providers", "nyckel", "--datasets", "beans", "--ablations", "5",
                               "--max-cost", "100", "--collect-only", "--results", str(tmp_path / "r.json")],
                              shared_cache_dir, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert "cost estimate at list prices" in completed.stdout
    assert "nyckel-beans-5" in completed.stdout


def test_spend_and_budget_from_recorded_run(tmp_path, shared_cache_dir):
    results = tmp_path / "results.json"
    with NyckelEmulator(training_polls=2) as emulator:
        run = run_benchmark_against(emulator, results, "budget", shared_cache_dir)
    assert run.returncode == 0, run.output[-3000:]
    record = run.records()["nyckel-beans-5"]
    assert recorded_spend(record) == 0.0

    # The same record as a live run would write it: only the mode differs.
    document = json.loads(results.read_text(encoding="utf-8"))
    for benchmark in document["benchmarks"]:
        benchmark["extra_info"]["mode"] = "live"
    results.write_text(json.dumps(document), encoding="utf-8")
    live_record = {**record, "mode": "live"}
    requests = len(record["predictions"]) + record["load_test"]["sent"]
    prices = get_provider_class("nyckel").price_model
    spent = recorded_spend(live_record)
    assert spent == pytest.approx(requests / 1000 * prices.per_1000_requests)

    config = BenchConfig(providers=("nyckel",), datasets=("beans",), ablations=(5, 20), results_path=results,
                         run_id="budget", load=LoadConfig(requests=10, concurrency=2),
                         provider_modes={"nyckel": "live"})
    next_case = CaseSpec("nyckel", "beans", 20)
    estimate = estimate_case(next_case, config)

    check_budget(next_case, config, spent + estimate.total_usd + 0.001)
    with pytest.raises(pytest.skip.Exception, match="spend so far"):
        check_budget(next_case, config, spent + estimate.total_usd - 0.001)
    emulated = BenchConfig(**{**config.__dict__, "provider_modes": {"nyckel": "emulator"}})
    check_budget(next_case, emulated, 0.0)
