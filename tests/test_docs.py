"""The documentation agrees with the code: every setting of
``lectr.config.SETTINGS`` is in the configuration tables of README.md and
docs/configuration.md with its option and default, and the docs name no
environment variable that nothing reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lectr.config import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
TABLE_DOCS = ("README.md", "docs/configuration.md")

# What looks like one of Lectr's environment variables in prose.
_ENV_RE = re.compile(r"\b(LECTR_[A-Z0-9_]*[A-Z0-9]|DATABASE_URL|ENCRYPTION_KEY\w*|AUTH0_[A-Z_]+)\b")
# Where a variable that is not a server setting must be read, for the docs to name it.
_SOURCES = ("lectr", "tests", "examples", ".ci")


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "examples").glob("*.md"))
    return [f for f in files if f.is_file()]


def settings_rows(text: str) -> dict[str, tuple[str, str]]:
    """Rows of the settings table: env var -> (option cell, default cell).
    A settings row is a table row whose second cell is one backticked
    variable name."""
    rows: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4:
            continue
        m = re.fullmatch(r"`([A-Z][A-Z0-9_]+)`", cells[1])
        if m:
            rows[m.group(1)] = (cells[0], cells[2])
    return rows


def _source_text() -> str:
    chunks = []
    for top in _SOURCES:
        base = ROOT / top
        paths = [base] if base.is_file() else sorted(base.rglob("*"))
        for path in paths:
            if path.is_file() and path.suffix in (".py", "") and "__pycache__" not in path.parts:
                if path.resolve() == Path(__file__).resolve():
                    continue  # this test names every variable it looks for
                try:
                    chunks.append(path.read_text())
                except UnicodeDecodeError:
                    continue
    return "\n".join(chunks)


@pytest.mark.parametrize("doc", TABLE_DOCS)
def test_every_setting_is_in_the_table_with_its_option_and_default(doc):
    rows = settings_rows((ROOT / doc).read_text())
    problems = []
    for s in SETTINGS:
        if s.env not in rows:
            problems.append(f"{s.env} is missing")
            continue
        option_cell, default_cell = rows[s.env]
        expected_option = f"`--{s.option}`" if s.option else "—"
        if option_cell != expected_option:
            problems.append(f"{s.env}: option {option_cell!r}, expected {expected_option!r}")
        if s.default is None:
            if not default_cell.startswith("unset"):
                problems.append(f"{s.env}: default {default_cell!r} should start with 'unset'")
        elif not default_cell.startswith(f"`{s.default}`"):
            problems.append(f"{s.env}: default {default_cell!r}, expected `{s.default}`")
    known = {s.env for s in SETTINGS}
    problems += [
        f"the table names {env}, which is not a setting" for env in rows if env not in known
    ]
    assert not problems, f"{doc}: " + "; ".join(problems)


def test_docs_name_only_variables_that_exist():
    settings = {s.env for s in SETTINGS}
    source = _source_text()
    unknown: dict[str, set[str]] = {}
    for path in _doc_files():
        for name in set(_ENV_RE.findall(path.read_text())):
            if name in settings:
                continue
            # Not a server setting: something else must read it (the CLI,
            # the tests, the examples, the worker processes).
            if not re.search(rf"\b{re.escape(name)}\b", source):
                unknown.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert not unknown, f"the docs name variables nothing reads: {unknown}"


def test_the_checks_catch_a_missing_setting_and_an_invented_variable():
    """The tests above can fail: a table without a setting, or with a
    variable that does not exist, is reported."""
    text = (ROOT / "docs/configuration.md").read_text()
    victim = SETTINGS[-1].env
    trimmed = "\n".join(line for line in text.splitlines() if f"`{victim}`" not in line)
    assert victim not in settings_rows(trimmed)
    invented = text + "\n| — | `LECTR_NO_SUCH_THING` | `1` | nothing |\n"
    assert "LECTR_NO_SUCH_THING" in settings_rows(invented)
    assert "LECTR_NO_SUCH_THING" not in {s.env for s in SETTINGS}
    assert not re.search(r"\bLECTR_NO_SUCH_THING\b", _source_text())
