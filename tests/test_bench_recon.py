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
