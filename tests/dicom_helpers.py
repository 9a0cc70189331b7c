"""Shared pieces of the DICOM output tests: dciodvfy (Debian's dicom3tools) on a written file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy``'s report on ``path`` that name an error (the test is skipped without it)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy is not installed (Debian/Ubuntu: apt-get install dicom3tools)")
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    report = done.stdout + done.stderr
    assert report.strip(), "dciodvfy printed nothing"  # it always names the IOD it checked
    return [line for line in report.splitlines() if "Error" in line]
