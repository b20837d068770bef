"""The ``imgbench`` command: ``report``, ``compare``, ``sweep`` and ``estimate``.

Exit codes. ``report``: 0 when the report was written, even with warnings;
1 when no result file contains a valid record; 2 for a usage error.
``compare``: 0 when no threshold was breached; 1 when one was; 2 for a usage
error, such as an invalid ``--fail-on`` threshold, or for a result file it
cannot read, since nothing was compared then. ``sweep``: 0 when nothing is
left (or everything found was deleted); 1 when something is left, because
deletion was not confirmed, a deletion failed or a listing failed; 2 for a
usage error. ``estimate``: 0, or 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import imgbench
from imgbench.compare import (THRESHOLD_FORMS, InvalidThresholdError, comparison_frame, compare_results,
                              format_markdown, format_text, parse_threshold)
from imgbench.resultfiles import ResultFileError, load_result_file

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _threshold_argument(text: str):
    try:
        return parse_threshold(text)
    except InvalidThresholdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgbench", description="Report on and compare imgbench result files, "
                                                                  "estimate a run's cost and sweep what runs left.")
    parser.add_argument("--version", action="version", version=f"imgbench {imgbench.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = commands.add_parser(
        "report", help="write an HTML report with CSV and Markdown tables",
        description="Write DIR/report.html (self-contained, opens offline), DIR/tables/*.csv and DIR/tables.md "
                    "from one or more result files. Exit status: 0 written, 1 no valid record in any file, "
                    "2 usage error.")
    report.add_argument("results", nargs="+", type=Path, metavar="RESULT.json", help="result files to report on")
    report.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write the report into")
    report.add_argument("--published", action="store_true",
                        help="overlay the figures published with the May 2023 benchmark, labelled as another run")

    compare = commands.add_parser(
        "compare", help="compare result files case by case, optionally failing on regressions",
        description="Compare NEW.json (and each further file) against BASE.json, matching cases on case_id. "
                    "Exit status: 0 no threshold breached, 1 a threshold breached, 2 usage error or "
                    "unreadable result file.",
        epilog=THRESHOLD_FORMS)
    compare.add_argument("base", type=Path, metavar="BASE.json", help="the result file to compare against")
    compare.add_argument("new", nargs="+", type=Path, metavar="NEW.json", help="result files to compare")
    compare.add_argument("--fail-on", action="append", default=[], type=_threshold_argument, metavar="THRESHOLD",
                         help="exit with status 1 when a case's figure changes past this limit, e.g. "
                              "accuracy:-2pt or latency_p50:+10%%; repeatable")
    compare.add_argument("--csv", type=Path, metavar="FILE", help="also write the comparison table as CSV")
    compare.add_argument("--markdown", type=Path, metavar="FILE", help="also write the comparison as Markdown")
    _add_sweep_parser(commands)
    _add_estimate_parser(commands)
    return parser


def _add_sweep_parser(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="list, and with confirmation delete, what benchmark runs left on the services",
        description="List every resource that a run ledger shows as not deleted, or that a provider's own "
                    "listing finds by run tag or name prefix, and delete them after confirmation. Exit status: "
                    "0 nothing left, 1 something left, 2 usage error.")
    which = sweep.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="sweep what the run with this id left")
    which.add_argument("--all", action="store_true", help="sweep what any imgbench run left")
    sweep.add_argument("--yes", action="store_true", help="delete without asking")
    sweep.add_argument("--ledger-dir", type=Path, default=Path("results/ledgers"), metavar="DIR",
                       help="folder of the run ledgers, ledgers/ beside the result files (default: results/ledgers)")
    sweep.add_argument("--providers", default="", help="comma-separated providers to list besides those the "
                                                       "ledgers name (default: only those)")
    sweep.add_argument("--service-url", action="append", default=[], metavar="PROVIDER=URL",
                       help="reach a provider at this URL, such as its emulator (default: $IMGBENCH_<PROVIDER>_URL, "
                            "else the real service with the credentials in the environment); repeatable")
    sweep.add_argument("--provider-option", action="append", default=[], metavar="PROVIDER.KEY=VALUE",
                       help="set one provider setting, as in the benchmark run; repeatable")


def _add_estimate_parser(commands) -> None:
    estimate = commands.add_parser(
        "estimate", help="print the cost of a selected matrix at the services' list prices",
        description="Estimate each case's cost (training hours, endpoint hours, requests) at list prices and "
                    "print the total. The options select the matrix as in `pytest bench_tests`.")
    estimate.add_argument("--providers", required=True, help="comma-separated providers")
    estimate.add_argument("--datasets", help="comma-separated datasets (default: beans,xrays)")
    estimate.add_argument("--ablations", help="comma-separated training images per class (default: 5,20,80,320,1280)")
    estimate.add_argument("--load-requests", type=int, default=1000, help="requests in each load test (default: 1000)")
    estimate.add_argument("--load-concurrency", type=int, default=10,
                          help="concurrent requests in each load test (default: 10)")
    estimate.add_argument("--load-warmup", type=int, default=0, help="warm-up requests per load test (default: 0)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "report":
        return run_report(args)
    if args.command == "sweep":
        return run_sweep(args)
    if args.command == "estimate":
        return run_estimate(args)
    return run_compare(args)


def _warn(message: str) -> None:
    print(f"imgbench: warning: {message}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"imgbench: error: {message}", file=sys.stderr)


def run_report(args: argparse.Namespace) -> int:
    # Imported here so that `imgbench compare` does not pay for matplotlib.
    from imgbench.report import generate_report

    try:
        written = generate_report(args.results, args.out, published=args.published)
    except ResultFileError as exc:
        _error(str(exc))
        return EXIT_FAILED
    for message in written.warnings:
        _warn(message)
    print(f"report: {written.html_path} ({written.records} records); tables: {written.tables_dir}/*.csv and "
          f"{written.markdown_path}")
    return EXIT_OK


def run_compare(args: argparse.Namespace) -> int:
    try:
        base = load_result_file(args.base)
        others = [load_result_file(path) for path in args.new]
    except ResultFileError as exc:
        _error(str(exc))
        return EXIT_USAGE
    for results in (base, *others):
        for message in results.warnings:
            _warn(message)

    comparisons = [compare_results(base, other, args.fail_on) for other in others]
    for comparison in comparisons:
        for message in comparison.warnings:
            _warn(message)
    sys.stdout.write(format_text(comparisons))
    if args.csv:
        comparison_frame(comparisons).to_csv(args.csv, index=False, lineterminator="\n")
    if args.markdown:
        args.markdown.write_text(format_markdown(comparisons), encoding="utf-8")

    breaches = [message for comparison in comparisons for message in comparison.breaches]
    for message in breaches:
        print(f"imgbench: threshold breached: {message}", file=sys.stderr)
    return EXIT_FAILED if breaches else EXIT_OK


def run_sweep(args: argparse.Namespace) -> int:
    from imgbench.config import parse_provider_options, split_names
    from imgbench.errors import ConfigError
    from imgbench.sweep import delete_items, parse_service_urls, plan_sweep

    try:
        providers = split_names(args.providers, "--providers") if args.providers else ()
        urls = parse_service_urls(args.service_url)
        options = parse_provider_options(args.provider_option)
        if providers:
            from imgbench.config import parse_providers

            providers = parse_providers(",".join(providers))
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    run_id = None if args.all else args.run_id
    plan, config = plan_sweep(args.ledger_dir, run_id, providers, urls, options)
    for problem in plan.problems:
        _warn(problem)
    scope = "any run" if run_id is None else f"run {run_id}"
    if not plan.items:
        print(f"nothing left by {scope}")
        return EXIT_FAILED if plan.problems else EXIT_OK
    print(f"{len(plan.items)} resources left by {scope}:")
    for item in plan.items:
        print(f"  {item.describe()}")
    if not args.yes and not _confirm(f"delete these {len(plan.items)} resources? [y/N] "):
        print("nothing deleted; run again with --yes to delete them")
        return EXIT_FAILED
    failures = delete_items(plan.items, config)
    for failure in failures:
        _error(failure)
    print(f"deleted {len(plan.items) - len(failures)} of {len(plan.items)} resources")
    return EXIT_FAILED if failures or plan.problems else EXIT_OK


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def run_estimate(args: argparse.Namespace) -> int:
    from imgbench.config import build_config
    from imgbench.costs import estimate_matrix
    from imgbench.errors import ConfigError

    try:
        config = build_config(providers=args.providers, datasets=args.datasets, ablations=args.ablations,
                              datasets_dir=None, dataset_paths={}, results=None, run_id="estimate",
                              load_requests=args.load_requests, load_concurrency=args.load_concurrency,
                              load_max_seconds=600.0, load_warmup=args.load_warmup, seed="imgbench-2023",
                              cache_dir=None)
        estimate = estimate_matrix(config)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    print(estimate.format())
    return EXIT_OK
