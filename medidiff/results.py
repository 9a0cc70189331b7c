"""What a task returns: one typed result for every task, recorded by the run (``medidiff.runs``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TaskResult"]


@dataclass
class TaskResult:
    """A task's result.

    Attributes:
        outputs: every file written (checksummed into the run's manifest).
        inputs: every file read (checksummed into the manifest).
        rows: the per-case table (``scores.csv``).
        metrics: the run's metric table (``metrics.json``), when there is a reference.
        summary: one line for the command line.
        failures: cases skipped (``failures.csv``).
        extra: task-specific values for the manifest (e.g. the threshold, the training step).
    """

    outputs: list[Path] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    summary: str = ""
    failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
