"""The reconstruction benchmark's store: a run cut short goes on from what it measured, never mixing settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_helpers import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_recon.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH, "bench_recon_under_test")


def test_store_measures_once_and_a_resumed_run_reads_it_back(bench, tmp_path):
    calls = []

    def measure(x, y):
        calls.append((x, y))
        return [x + y, {"psnr": [1.5, 2.5]}]

    path = tmp_path / "recon.json"
    store = bench.Store(path, {"seeds": [0, 1]}, resume=False)
    assert store.get("rows", "ct 30 views DDS 50", measure, 1, 2) == [3, {"psnr": [1.5, 2.5]}]
    assert store.get("rows", "ct 30 views DDS 50", measure, 5, 5) == [3, {"psnr": [1.5, 2.5]}]  # kept
    assert calls == [(1, 2)]
    assert json.loads(path.read_text())["rows"]["ct 30 views DDS 50"][0] == 3  # on disk at once
    again = bench.Store(path, {"seeds": [0, 1]}, resume=True)
    assert again.get("rows", "ct 30 views DDS 50", measure, 9, 9)[0] == 3 and calls == [(1, 2)]
    assert again.get("tuning", "ct dds eta=0.0 nfe=50", lambda: 32.0) == 32.0
    fresh = bench.Store(path, {"seeds": [0, 1]}, resume=False)  # without --resume: measured anew
    assert fresh.get("rows", "ct 30 views DDS 50", measure, 2, 2)[0] == 4
    with pytest.raises(SystemExit, match="other settings"):
        bench.Store(path, {"seeds": [0]}, resume=True)


def test_targets_take_the_best_dds_flavour_and_compare_it_with_pc_on_the_same_slices(bench):
    rows = [("TV", 0, 30.0, 0.9, 1.0), ("DDS", 20, 27.0, 0.8, 1.0), ("DDS", 50, 28.0, 0.8, 1.0),
            ("DDS", 100, 35.0, 0.9, 1.0),  # over 50 NFE: not a target row
            ("DDS, clip 1.0", 50, 29.0, 0.8, 1.0), ("PC", 1000, 29.5, 0.8, 1.0), ("DDS (2 slices)", 50, 27.0, 0.8, 1.0),
            ("DDS, clip 1.0 (2 slices)", 50, 29.25, 0.8, 1.0)]
    line = [x for x in bench.targets({"mri 4x": rows}) if x.startswith("| mri 4x")][0]
    assert line == "| mri 4x | 29.00 (DDS, clip 1.0) | 30.00 | 29.50 | -1.00 | -0.25 | no |"
    met = [r if r[0] != "TV" else ("TV", 0, 26.5, 0.9, 1.0) for r in rows]
    assert bench.targets({"x": met})[-2].endswith("| +2.50 | -0.25 | yes |")
    no_pc = [r for r in rows if r[0] != "PC"]
    assert bench.targets({"x": no_pc})[-2] == "| x | 29.00 (DDS, clip 1.0) | 30.00 | — | -1.00 | — | no |"
