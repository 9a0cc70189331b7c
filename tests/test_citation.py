"""The project's citation file, licence and changelog agree with the package metadata."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
_PYPROJECT = (ROOT / "pyproject.toml").read_text()
#: What the tests need of pyproject.toml's [project] table (read without tomllib, which Python 3.10 lacks).
PROJECT = {"version": re.search(r'^version = "([^"]+)"', _PYPROJECT, flags=re.M).group(1),
           "license": {"text": re.search(r'^license = \{ text = "([^"]+)" \}', _PYPROJECT, flags=re.M).group(1)}}


def test_citation_file_is_cff_with_the_package_version_and_the_methods_papers():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"] == "medidiff" and cff["message"]
    assert cff["version"] == PROJECT["version"] and cff["license"] == PROJECT["license"]["text"]
    assert cff["authors"] == [{"name": "medidiff contributors"}]
    titles = {ref["title"] for ref in cff["references"]}
    for words in ("Denoising Diffusion Probabilistic Models", "Stochastic Differential Equations",
                  "Denoising Diffusion Implicit Models", "Decomposed Diffusion Sampler", "Diffusion Posterior Sampling",
                  "Score-based diffusion models for accelerated MRI", "Solving 3D Inverse Problems",
                  "Implicit Image Segmentation Ensembles", "AnoDDPM", "MONAI"):
        assert any(words in t for t in titles), words
    for ref in cff["references"]:
        assert ref["authors"] and isinstance(ref["year"], int) and ref["type"] in ("article", "conference-paper")


def test_licence_is_the_one_pyproject_names():
    assert PROJECT["license"]["text"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_changelog_has_a_section_for_the_package_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "Keep a Changelog" in text and "## [Unreleased]" in text
    assert re.search(rf"^## \[{re.escape(PROJECT['version'])}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, flags=re.M)


def test_readme_says_how_to_cite_naming_the_papers():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How to cite", 1)[1].split("\n## ", 1)[0]
    for name in ("Ho", "Song", "Chung", "Wolleb", "Wyatt", "MONAI", "CITATION.cff"):
        assert name in section, name
