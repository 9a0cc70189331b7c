"""The curated mutants of ``scripts/mutants.py``: every plausible wrong formula in the core must fail a test.

Runs the script in a fresh interpreter (it copies ``medidiff/`` and ``tests/`` to a temporary folder, mutates
the copy, and runs each mutant's one to three test selections in forked children); about a minute on two cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mutants.py"


def _load():
    return load_script(SCRIPT, "mutants_script")


def test_mutants_are_well_formed():
    """At least 15 mutants, unique names, each text found exactly once in its file, each with tests to run."""
    mutants = _load().MUTANTS
    assert len(mutants) >= 15
    assert len({m.name for m in mutants}) == len(mutants)
    for m in mutants:
        assert (ROOT / m.path).read_text().count(m.old) == 1, m.name
        assert m.old != m.new and m.tests and (ROOT / m.tests[0].split("::")[0]).is_file(), m.name


@pytest.mark.slow
def test_every_curated_mutant_is_caught():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--no-baseline"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SURVIVED" not in proc.stdout
