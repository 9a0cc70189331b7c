"""docs/recipes.md is what scripts/recipe_reference.py writes from the recipe schema now, and documents every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from script_helpers import load_script

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def reference():
    return load_script(ROOT / "scripts" / "recipe_reference.py", "recipe_reference")


def test_the_committed_reference_matches_the_schema(reference):
    committed = (ROOT / "docs" / "recipes.md").read_text() if (ROOT / "docs" / "recipes.md").is_file() else ""
    assert committed == reference.render(), (
        "docs/recipes.md differs from the recipe schema: regenerate it with "
        "`.venv/bin/python scripts/recipe_reference.py` and commit it")


def test_every_recipe_key_is_listed_with_a_description(reference):
    from medidiff.recipes import Recipe, _all_keys

    text = reference.render()
    rows = {m[0]: m[1] for m in re.findall(r"^\| `([a-z0-9_.]+)` \|.*\| (.*) \|$", text, flags=re.M)}
    assert set(_all_keys(Recipe)) <= set(rows)
    assert not [key for key, description in rows.items() if description in ("", "—")]


def test_types_defaults_and_descriptions_come_from_the_models(reference):
    text = reference.render()
    assert "| `anomaly.fpr` | float (> 0, < 1) | `0.01` | voxel false-positive rate" in text
    assert "| `segment.sampling.members` | int (> 0) | `10` |" in text
    assert "| `recon.solver.name` | one of `dds`, `dps`, `pc`, `merge` | `dds` |" in text
    assert "| `anomaly.inputs` | path or null | `null` |" in text
    assert "| `data.labels` | section or null | `null` |" in text and "## `data.labels`" in text
    # a docstring entry naming several keys describes each of them
    assert re.search(r"\| `process.beta_min` \|.*\| VP and sub-VP SDE parameters\. \|", text)


def test_docstring_attributes_are_parsed_with_continuations(reference):
    class Example:
        """An example.

        Attributes:
            a, b: two keys
                described together.
            c: one key.

        More text.
        """

    assert reference.attribute_docs(Example) == {"a": "two keys described together.", "b":
                                                 "two keys described together.", "c": "one key."}


def test_check_mode_names_the_command(reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reference, "OUTPUT", tmp_path / "docs" / "recipes.md")
    monkeypatch.setattr(reference, "ROOT", tmp_path)
    assert reference.main(["--check"]) == 1
    assert "python scripts/recipe_reference.py" in capsys.readouterr().out
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0


def test_the_readme_links_the_reference_and_the_project_documents():
    readme = (ROOT / "README.md").read_text()
    for name in ("docs/recipes.md", "LICENSE", "CITATION.cff", "CHANGELOG.md"):
        assert f"]({name})" in readme and (ROOT / name).is_file()
