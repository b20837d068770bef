"""The ``imgbench`` command: ``imgbench report`` and ``imgbench compare``.

Exit codes. ``report``: 0 when the report was written, even with warnings;
1 when no result file contains a valid record; 2 for a usage error.
``compare``: 0 when no threshold was breached; 1 when one was; 2 for a usage
error, such as an invalid ``--fail-on`` threshold, or for a result file it
cannot read, since nothing was compared then.
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
    parser = argparse.ArgumentParser(prog="imgbench", description="Report on and compare imgbench result files.")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "report":
        return run_report(args)
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
