"""pytest plugin: command-line options, the case matrix, and result recording.

Loaded by the repository's top-level ``conftest.py``. Each test that takes the
``case`` fixture is parametrised over the selected (provider, dataset,
ablation) cases, with ids such as ``local-beans-20``. Case records travel to
the controlling process in the teardown report's ``user_properties``, which
pytest-xdist forwards from its workers, so the result file is written in one
place however the run is distributed.

Cloud providers' cases run in replay mode by default: their traffic comes from
``cassettes/<provider>/<case id>.yaml`` and is marked ``replay``. A run is
live, and cloud cases are marked ``live``, when ``--live`` is given or when the
``-m`` expression selects an item marked only ``live`` and rejects one marked
only ``replay`` (so ``-m live`` runs live, ``-m "not local"`` replays).
``--nyckel-url`` runs Nyckel against an emulator (mark ``emulator``), and
``--record-mode`` records cassettes in that run.

Resume and teardown: a run started again with the same ``--run-id`` and
``--results`` skips the cases the result file records as passed and keeps
their records (``fixtures/cases.py`` reuses a model an earlier attempt left).
SIGTERM becomes ``KeyboardInterrupt`` (``imgbench.interrupts``), after which
pytest still runs the fixtures' teardown, with ``keep_model`` set so a trained
model survives for the resumed run. At the end of the session the terminal
summary lists every resource the run ledger still shows, with the
``imgbench sweep`` command that deletes them. ``--max-cost`` rejects a run
whose estimate exceeds it.
"""

from __future__ import annotations

import json
import logging
import os

from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

from imgbench import interrupts
from imgbench.config import (SERVICE_URL_ENV, BenchConfig, CaseSpec, build_config, missing_live_credentials,
                             parse_provider_options)
from imgbench.datasets import DATASETS_DIR_ENV, parse_dataset_paths
from imgbench.errors import ConfigError, error_kind
from imgbench.recording import DEFAULT_RECORD_MODE, RECORD_MODES
from imgbench.results import RECORD_PROPERTY, ResultWriter, earlier_records, finished_case_ids
from imgbench.summary import format_summary_table

logger = logging.getLogger(__name__)

CONFIG_KEY = pytest.StashKey[BenchConfig]()
RECORD_KEY = pytest.StashKey[dict]()
WRITER_KEY = pytest.StashKey[ResultWriter]()
EARLIER_KEY = pytest.StashKey[list]()
FINISHED_KEY = pytest.StashKey[frozenset]()
CRASHED_KEY = pytest.StashKey[list]()

# Maximum length of an error message kept in a record, in characters.
MAX_ERROR_CHARS = 2000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("imgbench", "image-classification benchmark")
    group.addoption("--providers", help="comma-separated providers to benchmark (default: local)")
    group.addoption("--datasets", help="comma-separated datasets (default: beans,xrays)")
    group.addoption("--ablations", help="comma-separated training images per class (default: 5,20,80,320,1280)")
    group.addoption("--datasets-dir", help=f"folder of offline dataset copies, one sub-folder per dataset "
                                           f"(default: ${DATASETS_DIR_ENV}; unset means the Hugging Face Hub)")
    group.addoption("--dataset-path", action="append", default=[], metavar="KEY=PATH",
                    help="read one dataset from a local image folder <split>/<class>/<file>; repeatable")
    group.addoption("--results", help="result JSON file to write (default: results/imgbench-<run id>.json)")
    group.addoption("--run-id", help="identifier of this run, used in the default result file name")
    group.addoption("--load-requests", type=int, default=1000, help="requests in each load test (default: 1000)")
    group.addoption("--load-concurrency", type=int, default=10,
                    help="concurrent requests in each load test (default: 10)")
    group.addoption("--report-dir", help="also render the HTML report of this run into this folder, with the "
                                         "published 2023 figures overlaid (default: no report)")
    group.addoption("--load-warmup", type=int, default=0,
                    help="requests sent before each load test and kept out of its figures (default: 0)")
    group.addoption("--load-max-seconds", type=float, default=600.0,
                    help="wall-time limit of one load test in seconds (default: 600)")
    group.addoption("--ablation-seed", default="imgbench-2023",
                    help="seed of the deterministic training-image sample (default: imgbench-2023)")
    group.addoption("--cache-dir", help="cache folder for Hub downloads and embeddings "
                                        "(default: $IMGBENCH_CACHE_DIR or ~/.cache/imgbench)")
    group.addoption("--live", action="store_true", default=False,
                    help="run cloud providers against the real services (needs credentials, costs money); "
                         "-m live does the same")
    group.addoption("--record-mode", choices=RECORD_MODES, default=DEFAULT_RECORD_MODE,
                    help="cassette record mode of cloud providers in emulator or live runs: none, once "
                         "(record missing cassettes), new_episodes or all (default: none)")
    group.addoption("--cassette-dir", help="folder of recorded cassettes, <provider>/<case id>.yaml "
                                           "(default: cassettes/ in the root folder)")
    group.addoption("--provider-option", action="append", default=[], metavar="PROVIDER.KEY=VALUE",
                    help="set one provider setting, such as aws.bucket=my-bucket; repeat for more "
                         "(each provider's documentation lists its keys)")
    group.addoption("--max-cost", type=float, metavar="USD",
                    help="reject a run whose cost estimate at list prices exceeds this many US dollars, and "
                         "start no case once the spend so far plus its estimate would exceed it (default: no limit)")
    for name, variable in SERVICE_URL_ENV.items():
        group.addoption(f"--{name}-url", help=f"run {name} against this base URL, such as its emulator's "
                                              f"http://127.0.0.1:PORT (default: ${variable}; unset means replay, "
                                              "or the real service in a live run)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "emulator: runs a cloud provider against its emulator on 127.0.0.1")
    live = config.getoption("live") or markexpr_selects_live(config.getoption("markexpr", ""))
    service_urls = {name: config.getoption(f"{name}_url") for name in SERVICE_URL_ENV
                    if config.getoption(f"{name}_url")}
    try:
        bench_config = build_config(
            providers=config.getoption("providers"),
            datasets=config.getoption("datasets"),
            ablations=config.getoption("ablations"),
            datasets_dir=config.getoption("datasets_dir"),
            dataset_paths=parse_dataset_paths(config.getoption("dataset_path")),
            results=config.getoption("results"),
            run_id=_shared_run_id(config),
            load_requests=config.getoption("load_requests"),
            load_concurrency=config.getoption("load_concurrency"),
            load_max_seconds=config.getoption("load_max_seconds"),
            load_warmup=config.getoption("load_warmup"),
            seed=config.getoption("ablation_seed"),
            cache_dir=config.getoption("cache_dir"),
            live=live,
            service_urls=service_urls,
            provider_options=parse_provider_options(config.getoption("provider_option")),
            record_mode=config.getoption("record_mode"),
            cassette_dir=config.getoption("cassette_dir") or str(config.rootpath / "cassettes"),
        )
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from exc
    missing = missing_live_credentials(bench_config.providers, bench_config.provider_modes)
    if missing:
        raise pytest.UsageError(
            f"a live run needs the credentials {', '.join(missing)}; set them, or leave out -m live / --live "
            "to replay the recorded cassettes"
        )
    try:
        check_run_settings(bench_config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from exc
    config.stash[CONFIG_KEY] = bench_config
    _prepare_resume(config, bench_config)
    _check_max_cost(config, bench_config)
    if any(mode != "local" for mode in bench_config.provider_modes.values()):
        interrupts.install_handlers(forward_to_children=not hasattr(config, "workerinput"))


def _prepare_resume(config: pytest.Config, bench_config: BenchConfig) -> None:
    """Read the records of an earlier attempt of this run; workers get the finished case ids from the controller."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        config.stash[EARLIER_KEY] = []
        config.stash[FINISHED_KEY] = frozenset(workerinput.get("imgbench_finished_cases", ()))
        return
    try:
        records = earlier_records(bench_config.results_path, bench_config.run_id)
    except ValueError as exc:
        raise pytest.UsageError(f"{exc}; choose another --results path or move the file aside") from exc
    config.stash[EARLIER_KEY] = records
    config.stash[FINISHED_KEY] = frozenset(finished_case_ids(records))


def finished_cases(config: pytest.Config) -> frozenset:
    """Return the ids of the cases an earlier attempt of this run finished."""
    return config.stash.get(FINISHED_KEY, frozenset())


def _check_max_cost(config: pytest.Config, bench_config: BenchConfig) -> None:
    max_cost = config.getoption("max_cost")
    if max_cost is None or hasattr(config, "workerinput"):
        return
    if max_cost < 0:
        raise pytest.UsageError(f"invalid --max-cost {max_cost}; use 0 or more US dollars")
    from imgbench.costs import estimate_matrix, recorded_spend, unenforceable_reason

    estimate = estimate_matrix(bench_config, skip=finished_cases(config))
    reason = unenforceable_reason(estimate, bench_config.provider_modes)
    if reason:
        raise pytest.UsageError(reason)
    spent = sum(recorded_spend(record) for record in config.stash[EARLIER_KEY])
    billed = estimate.billed_usd(bench_config.provider_modes)
    if spent + billed > max_cost:
        raise pytest.UsageError(
            f"the run's cost estimate is {spent + billed:.2f} USD ({billed:.2f} USD for the live cases to run, "
            f"{spent:.2f} USD spent by an earlier attempt), over --max-cost {max_cost:.2f} USD; "
            "select fewer cases or raise --max-cost (see `python -m imgbench estimate`)"
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Print the cost estimate before a live run, or before any run given --max-cost."""
    bench_config = config.stash.get(CONFIG_KEY, None)
    if bench_config is None:
        return []
    live = "live" in bench_config.provider_modes.values()
    if not live and config.getoption("max_cost") is None:
        return []
    from imgbench.costs import estimate_matrix

    estimate = estimate_matrix(bench_config, skip=finished_cases(config))
    heading = "cost estimate at list prices" + ("" if live else " (this run is not live, so it costs nothing)")
    return [f"imgbench {heading}:", *estimate.format().splitlines()]


def check_run_settings(bench_config: BenchConfig) -> None:
    """Fail at start, not after the first case, on an unusable result path or provider setting."""
    results_dir = bench_config.results_path.parent
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        probe = results_dir / f".imgbench-write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write results to {str(bench_config.results_path)!r} ({exc.strerror}); "
                          "choose a writable path with --results") from exc
    from providers import get_provider_class

    # Building a provider parses its settings and environment variables; it
    # sends no request, and each case builds its own provider object again.
    for name in bench_config.providers:
        get_provider_class(name).from_config(bench_config)


def markexpr_selects_live(markexpr: str) -> bool:
    """Return True when ``-m markexpr`` selects live-only items and rejects replay-only ones."""
    if not markexpr:
        return False
    try:
        expression = Expression.compile(markexpr)
    except SyntaxError:
        return False  # pytest reports the invalid expression itself

    def selects(marker: str) -> bool:
        return expression.evaluate(lambda name, **kwargs: name == marker and not kwargs)

    return selects("live") and not selects("replay")


def _shared_run_id(config: pytest.Config) -> str | None:
    """Return the run id, the same in pytest-xdist workers as in the controller."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput and "imgbench_run_id" in workerinput:
        return workerinput["imgbench_run_id"]
    return config.getoption("run_id")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Hand the controller's run id to each pytest-xdist worker."""
    node.workerinput["imgbench_run_id"] = node.config.stash[CONFIG_KEY].run_id
    node.workerinput["imgbench_finished_cases"] = sorted(finished_cases(node.config))


CASE_MARKS = {"local": pytest.mark.local, "replay": pytest.mark.replay, "emulator": pytest.mark.emulator,
              "live": pytest.mark.live}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    bench_config = metafunc.config.stash[CONFIG_KEY]
    params = [pytest.param(case, id=case.case_id, marks=[CASE_MARKS[bench_config.case_mode(case)]])
              for case in bench_config.cases()]
    metafunc.parametrize("case", params)


def new_record(item: pytest.Item, case: CaseSpec, bench_config: BenchConfig) -> dict:
    """Start the record of one case; fixtures and the test fill it in.

    A replayed case's timings measure the replay, not the service, so its
    record has ``timings_measured: false``.
    """
    record = _bare_record(case, bench_config, item.nodeid)
    item.stash[RECORD_KEY] = record
    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    record = item.stash.get(RECORD_KEY, None)
    if record is None:
        return report
    if report.failed and record["error"] is None:
        exc = call.excinfo.value if call.excinfo else None
        record["status"] = "failed"
        record["error"] = {
            "phase": report.when,
            "kind": error_kind(exc) if exc is not None else "unknown",
            "type": type(exc).__name__ if exc is not None else None,
            "message": (str(exc) if exc is not None else report.longreprtext)[:MAX_ERROR_CHARS],
        }
    elif report.skipped and record["status"] == "running":
        record["status"] = "skipped"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        record["error"] = {"phase": report.when, "kind": "skipped", "type": None,
                           "message": reason.removeprefix("Skipped: ")}
    if report.when == "teardown":
        if record["status"] == "running":
            record["status"] = "passed"
        report.user_properties.append((RECORD_PROPERTY, plain_data(record)))
    return report


def _to_plain(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):  # numpy arrays
        return value.tolist()
    return str(value)


def plain_data(record: dict) -> dict:
    """Return ``record`` as JSON types only, which pytest-xdist can send between processes."""
    return json.loads(json.dumps(record, default=_to_plain))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == RECORD_PROPERTY:
            _writer_add(value)


_session_config: list[pytest.Config] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _session_config[:] = [session.config]
    config = session.config
    if not hasattr(config, "workerinput") and config.stash.get(EARLIER_KEY, None):
        # Resuming: the result file starts from the earlier attempt's records.
        _result_writer(config)


def pytest_keyboard_interrupt(excinfo) -> None:
    interrupts.note_interrupted()


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report, sched) -> None:
    """Record a case whose pytest-xdist worker died; the ledger shows what it left behind."""
    config = _session_config[0] if _session_config else None
    if config is None or CONFIG_KEY not in config.stash:
        return
    bench_config = config.stash[CONFIG_KEY]
    case_id = crashitem.rpartition("[")[2].rstrip("]")
    case = next((case for case in bench_config.cases() if case.case_id == case_id), None)
    if case is None:
        return
    config.stash.setdefault(CRASHED_KEY, []).append(case_id)
    record = _bare_record(case, bench_config, crashitem)
    record["status"] = "failed"
    record["error"] = {"phase": "unknown", "kind": "worker_crashed", "type": None,
                       "message": f"the pytest-xdist worker running {crashitem} died; see the ledger for what it "
                                  "left on the service"}
    _writer_add(record)


def _bare_record(case: CaseSpec, bench_config: BenchConfig, nodeid: str) -> dict:
    mode = bench_config.case_mode(case)
    return {"case_id": case.case_id, "nodeid": nodeid, "provider": case.provider, "dataset": case.dataset,
            "ablation": case.ablation, "run_id": bench_config.run_id, "mode": mode, "status": "running",
            "error": None, "timings_measured": mode != "replay", "seconds": {}}


def _writer_add(record: dict) -> None:
    config = _session_config[0] if _session_config else None
    if config is None or hasattr(config, "workerinput"):
        return  # workers forward their reports; only the controller writes
    _result_writer(config).add(record)


def _result_writer(config: pytest.Config) -> ResultWriter:
    writer = config.stash.get(WRITER_KEY, None)
    if writer is None:
        bench_config = config.stash[CONFIG_KEY]
        machine_info = config.hook.pytest_benchmark_generate_machine_info(config=config) or {}
        commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config) or {}
        settings = {
            "providers": list(bench_config.providers),
            "datasets": list(bench_config.datasets),
            "ablations": list(bench_config.ablations),
            "load_requests": bench_config.load.requests,
            "load_concurrency": bench_config.load.concurrency,
            "ablation_seed": bench_config.seed,
            "provider_modes": dict(bench_config.provider_modes),
            "record_mode": bench_config.record_mode,
        }
        writer = ResultWriter(bench_config.results_path, bench_config.run_id, machine_info, commit_info, settings,
                              records=config.stash.get(EARLIER_KEY, []))
        config.stash[WRITER_KEY] = writer
    return writer


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        _report_outstanding(terminalreporter, config)
    writer = config.stash.get(WRITER_KEY, None)
    if writer is None or not writer.records:
        return
    terminalreporter.section("imgbench results")
    for line in format_summary_table(writer.records).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"results written to {writer.path}")
    report_dir = config.getoption("report_dir")
    if report_dir:
        _write_report(terminalreporter, writer.path, Path(report_dir))


def _report_outstanding(terminalreporter, config: pytest.Config) -> None:
    """List what the run ledger shows as not deleted, with the command that deletes it."""
    bench_config = config.stash.get(CONFIG_KEY, None)
    if bench_config is None:
        return
    from imgbench.ledger import RunLedger, ledger_path

    path = ledger_path(bench_config.results_path, bench_config.run_id)
    try:
        outstanding = RunLedger(path, bench_config.run_id).outstanding()
    except ConfigError as exc:
        terminalreporter.write_line(f"imgbench: cannot read the run ledger: {exc}", red=True)
        return
    crashed = config.stash.get(CRASHED_KEY, [])
    if not outstanding and not crashed:
        return
    terminalreporter.section("imgbench resources left on the services")
    for case_id in crashed:
        terminalreporter.write_line(f"worker crashed while running {case_id}", red=True)
    for entry in outstanding:
        note = " (kept for a resumed run)" if entry.state == "kept" else ""
        terminalreporter.write_line(f"{entry.provider} {entry.kind} {entry.resource_id} "
                                    f"{_details_text(entry.details)} case {entry.case_id}{note}", red=True)
    if outstanding:
        providers = sorted({entry.provider for entry in outstanding})
        resume_flags, sweep_flags = _service_flags(bench_config, providers)
        terminalreporter.write_line(
            f"resume with the same --run-id {bench_config.run_id} --results {bench_config.results_path}"
            f"{resume_flags}, or delete them with: python -m imgbench sweep --run-id {bench_config.run_id} "
            f"--ledger-dir {path.parent}{sweep_flags}")


def _service_flags(bench_config: BenchConfig, providers: list[str]) -> tuple[str, str]:
    """Return the service URL and provider settings that a resume and a sweep of ``providers`` need.

    Without the emulator's URL a sweep would address the real service.
    """
    resume, sweep = [], []
    for name in providers:
        url = bench_config.service_urls.get(name)
        if url and bench_config.provider_modes.get(name) == "emulator":
            resume.append(f"--{name}-url {url}")
            sweep.append(f"--service-url {name}={url}")
        for key, value in sorted(bench_config.provider_options.get(name, {}).items()):
            option = f"--provider-option {name}.{key}={value}"
            resume.append(option)
            sweep.append(option)
    return "".join(" " + flag for flag in resume), "".join(" " + flag for flag in sweep)


def _details_text(details: dict) -> str:
    shown = {key: value for key, value in details.items() if not key.startswith("imgbench_")}
    return " ".join(f"{key}={value}" for key, value in sorted(shown.items()))


def _write_report(terminalreporter, results_path: Path, report_dir: Path) -> None:
    """Render the HTML report of this run; a failure here never touches the results."""
    from imgbench.report import generate_report

    try:
        written = generate_report([results_path], report_dir, published=True)
    except Exception as exc:  # reported in the summary; the result file is already complete
        logger.exception("rendering the report into %s failed", report_dir)
        terminalreporter.write_line(f"report not written: {type(exc).__name__}: {exc}; "
                                    f"run 'imgbench report {results_path} --out {report_dir}' to retry", red=True)
        return
    terminalreporter.write_line(f"report written to {written.html_path}")
