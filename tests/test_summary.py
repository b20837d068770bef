"""The end-of-run summary table and the mode labels it prints."""

from __future__ import annotations

from imgbench.summary import format_summary_table, mode_label


def record(**fields) -> dict:
    base = {"case_id": "nyckel-beans-5", "provider": "nyckel", "dataset": "beans", "ablation": 5,
            "status": "passed", "error": None, "mode": "replay", "timings_measured": False,
            "cassette": {"recorded_against": "emulator"}, "classification": {"accuracy": 0.5},
            "seconds": {"training": 1.0, "upload_to_endpoint": 2.0},
            "test_latency": {"p50_s": 0.002, "p95_s": 0.003}, "load_test": {"wall_s": 0.1, "failed": 0}}
    base.update(fields)
    return base


def test_replay_names_recording_source():
    assert mode_label(record()) == "replay of emulator"


def test_local_mode_label_plain():
    assert mode_label(record(mode="local", cassette=None)) == "local"


def test_replayed_timings_not_printed():
    table = format_summary_table([record()])
    row = table.splitlines()[2]
    assert "replay of emulator" in row
    assert "0.500" in row
    assert "2.0" not in row
    assert "not measure" in table


def test_measured_timings_printed():
    table = format_summary_table([record(mode="local", timings_measured=True, cassette=None)])
    assert "2.0" in table.splitlines()[2]
