"""The README's benchmark tables are printed from committed result files (bench/readme_rows.py), never
typed by hand: every generated row or cell must be in the README as it is printed today."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import readme_rows

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("kind", sorted(readme_rows.ROWS))
def test_the_readme_shows_what_the_result_files_say(kind: str) -> None:
    readme = README.read_text(encoding="utf-8")
    lines = set(readme.splitlines())
    printed = readme_rows.ROWS[kind]()
    if "\n" in printed:  # a whole table: each of its rows is a README line
        missing = [row for row in printed.splitlines() if row not in lines]
    else:  # one cell of a row
        missing = [] if printed in readme else [printed]
    assert not missing, f"README is stale: rerun `python bench/readme_rows.py {kind}` and paste: {missing}"
