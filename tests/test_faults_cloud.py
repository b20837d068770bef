"""Signals and killed workers at each lifecycle step of an AWS, Vertex AI and Hugging Face case.

Each test runs ``pytest bench_tests`` in a child process against the Nyckel
emulator and one cloud provider's emulator, on the mini beans data at
ablation 5. The Nyckel case runs first and finishes. The cloud case then
meets SIGTERM, sent to the pytest process when the emulator receives the
first request of a step (upload, training, deploy, invoke, teardown). In
one test per provider, a SIGKILL ends the pytest-xdist worker instead,
while training runs. Afterwards the
results file must still hold the finished Nyckel record, the ledger must
list whatever the emulator still holds, ``python -m imgbench sweep --yes``
must delete it, a second sweep must find nothing, and every emulator must
hold zero resources.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from imgbench.emulators.aws import RekognitionEmulator
from imgbench.emulators.huggingface import HuggingFaceEmulator
from imgbench.emulators.nyckel import NyckelEmulator
from imgbench.emulators.vertex import VertexEmulator
from providers.aws import EMULATOR_BUCKET
from tests.benchrun import BenchRun, finish, kill_workers, run_sweep, signal_process, start_benchmark

STEPS = ("upload", "training", "deploy", "invoke", "teardown")
NYCKEL_CASE_ID = "nyckel-beans-5"
LOAD_REQUESTS = 20


@dataclass(frozen=True)
class CloudFaults:
    """How to start one provider's emulator, reach its lifecycle steps and count what it holds."""

    provider: str
    start_emulator: Callable[[], object]
    # Lifecycle step -> the emulator's route, operation or request pattern of the step's first request,
    # and how many matching requests an earlier step sends first.
    step_requests: dict[str, tuple[str, int]]
    # The request, repeated while training runs, at which the worker is killed.
    training_poll: str
    count_resources: Callable[[object, str], dict[str, int]]

    @property
    def case_id(self) -> str:
        return f"{self.provider}-beans-5"


def aws_resources(emulator: RekognitionEmulator, run_id: str) -> dict[str, int]:
    # moto's S3 store is shared by every emulator in the process, so count only this run's objects.
    objects = [key for key in emulator.object_keys(EMULATOR_BUCKET) if run_id in key]
    return {"projects": len(emulator.project_arns()), "datasets": len(emulator.dataset_arns()),
            "project_versions": len(emulator.version_states()), "objects": len(objects)}


def vertex_resources(emulator: VertexEmulator, run_id: str) -> dict[str, int]:
    return emulator.resource_counts()


def huggingface_resources(emulator: HuggingFaceEmulator, run_id: str) -> dict[str, int]:
    return {kind: len(names) for kind, names in emulator.resources().items()}


CLOUDS = {
    "aws": CloudFaults(
        "aws", lambda: RekognitionEmulator(training_polls=3, start_polls=1, stop_polls=1),
        {"upload": ("CreateDataset", 0), "training": ("CreateProjectVersion", 0),
         "deploy": ("StartProjectVersion", 0), "invoke": ("DetectCustomLabels", 0),
         "teardown": ("StopProjectVersion", 0)},
        "DescribeProjectVersions", aws_resources),
    "vertex": CloudFaults(
        "vertex", lambda: VertexEmulator(operation_polls=1, training_polls=3),
        {"upload": (r"^POST /upload/storage/", 0), "training": (r"^POST .*/trainingPipelines$", 0),
         "deploy": (r"^POST .*/endpoints/[^/]+:deployModel$", 0), "invoke": (r"^POST .*:predict$", 0),
         "teardown": (r"^POST .*:undeployModel$", 0)},
        r"^GET .*/trainingPipelines/[^/:]+$", vertex_resources),
    "huggingface": CloudFaults(
        # No 503 responses while the replica starts, so deploy's probe is exactly one ``serve`` request.
        "huggingface", lambda: HuggingFaceEmulator(training_reads=3, startup_reads=2, startup_503=0),
        {"upload": ("repo_create", 0), "training": ("job_create", 0), "deploy": ("endpoint_create", 0),
         "invoke": ("serve", 1), "teardown": ("endpoint_delete", 0)},
        "job_read", huggingface_resources),
}


@pytest.fixture
def nyckel():
    with NyckelEmulator(training_polls=2) as running:
        yield running


@pytest.fixture
def cloud(request):
    faults = CLOUDS[request.param]
    with faults.start_emulator() as running:
        yield faults, running


def on_later_request(emulator, request: str, skip: int, callback: Callable[[], None]) -> None:
    """Run ``callback`` when the request after ``skip`` earlier matching ones arrives."""
    if skip == 0:
        emulator.on_request(request, callback)
    else:
        emulator.on_request(request, lambda: on_later_request(emulator, request, skip - 1, callback))


def start_run(nyckel: NyckelEmulator, emulator, holder: list, results, run_id: str, cache_dir, *extra: str):
    holder.append(start_benchmark([nyckel, emulator], results, run_id, cache_dir, *extra,
                                  load_requests=LOAD_REQUESTS))
    return finish(holder[0], results, run_id)


def assert_nyckel_record_kept(run: BenchRun, nyckel: NyckelEmulator) -> None:
    records = run.records()
    assert NYCKEL_CASE_ID in records, f"records in {run.results}: {sorted(records)}\n{run.output[-3000:]}"
    record = records[NYCKEL_CASE_ID]
    assert record["status"] == "passed", run.output[-3000:]
    assert record["load_test"]["succeeded"] == LOAD_REQUESTS
    assert len(record["predictions"]) > 0
    assert nyckel.functions == {}


def assert_ledger_lists_leftovers(faults: CloudFaults, emulator, run: BenchRun) -> None:
    left = {kind: count for kind, count in faults.count_resources(emulator, run.run_id).items() if count}
    outstanding = run.ledger().outstanding()
    if left:
        assert outstanding, f"the emulator holds {left} but the ledger lists nothing outstanding"
    if outstanding:
        assert f"imgbench sweep --run-id {run.run_id}" in run.output, run.output[-3000:]


def sweep_to_zero(faults: CloudFaults, nyckel: NyckelEmulator, emulator, run: BenchRun) -> None:
    outstanding = run.ledger().outstanding()
    swept = run_sweep([nyckel, emulator], run.results, run.run_id, "--yes")
    again = run_sweep([nyckel, emulator], run.results, run.run_id, "--yes")

    assert swept.returncode == 0, swept.stdout + swept.stderr
    if outstanding:
        assert f"resources left by run {run.run_id}" in swept.stdout, swept.stdout + swept.stderr
        assert re.search(r"deleted (\d+) of \1 resources", swept.stdout), swept.stdout + swept.stderr
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"nothing left by run {run.run_id}" in again.stdout, again.stdout + again.stderr
    left = faults.count_resources(emulator, run.run_id)
    assert left == dict.fromkeys(left, 0), swept.stdout + swept.stderr
    assert nyckel.functions == {}
    assert run.ledger().outstanding() == []


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("cloud", list(CLOUDS), indirect=True)
def test_sigterm_at_step(cloud, step, nyckel, tmp_path, shared_cache_dir):
    faults, emulator = cloud
    run_id = f"sigterm-{faults.provider}-{step}"
    holder: list = []
    request, skip = faults.step_requests[step]
    on_later_request(emulator, request, skip, signal_process(holder, signal.SIGTERM))

    run = start_run(nyckel, emulator, holder, tmp_path / "results.json", run_id, shared_cache_dir)

    assert run.returncode == 2, run.output[-3000:]
    assert_nyckel_record_kept(run, nyckel)
    # pytest writes no report, and so no record, for a case that KeyboardInterrupt stops in any phase,
    # teardown included. A resumed run then runs the case again.
    assert run.records().get(faults.case_id, {}).get("status") != "passed"
    if step != "teardown":
        # Teardown after an interrupt deletes everything but a trained model kept for a resumed run.
        outstanding = run.ledger().outstanding()
        assert [entry for entry in outstanding if entry.state != "kept"] == []
    if step == "upload":
        assert outstanding == []
    if step in ("deploy", "invoke"):
        # The signal came after training, so the trained model is kept.
        assert ("model", "kept") in {(entry.kind, entry.state) for entry in outstanding}
    assert_ledger_lists_leftovers(faults, emulator, run)
    sweep_to_zero(faults, nyckel, emulator, run)


@pytest.mark.parametrize("cloud", list(CLOUDS), indirect=True)
def test_killed_worker_in_training(cloud, nyckel, tmp_path, shared_cache_dir):
    faults, emulator = cloud
    run_id = f"crash-{faults.provider}"
    holder: list = []
    emulator.on_request(faults.training_poll, kill_workers(holder))

    run = start_run(nyckel, emulator, holder, tmp_path / "results.json", run_id, shared_cache_dir, "-n", "1")

    assert run.returncode == 1, run.output[-3000:]
    assert_nyckel_record_kept(run, nyckel)
    record = run.records()[faults.case_id]
    assert record["status"] == "failed"
    assert record["error"]["kind"] == "worker_crashed"
    assert f"worker crashed while running {faults.case_id}" in run.output
    assert {entry.state for entry in run.ledger().outstanding()} == {"created"}
    assert_ledger_lists_leftovers(faults, emulator, run)
    sweep_to_zero(faults, nyckel, emulator, run)
