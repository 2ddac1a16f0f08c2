"""The documentation names only what exists, and describes what the code
does where a machine can check it:

- every repository path quoted in README.md, CONTRIBUTING.md, docs/ and
  examples/ (``tests/…``, ``lectr/…``, ``bench/…``) exists, every
  ``lectr.module.name`` resolves, every ``tests/file.py::test_name`` and
  quoted ``test_…`` name is a test, every relative link and its anchor
  lands;
- the command table of docs/cli.md has every command and option of the
  ``lectr`` parser, and no option it lacks;
- every ``METHOD /admin/…`` the docs quote is a declared route, and
  docs/admin-api.md quotes every route; every status a handler returns or
  raises itself is in the OpenAPI document (tests/test_admin_openapi.py
  checks the routes themselves, tests/support/admin.py each answer a test
  receives);
- the error table of docs/integration.md agrees with the dialects' error
  bodies and with the exception each SDK raises for them.

(tests/test_docs.py checks the settings tables.)"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "examples").glob("*.md"))
    return [f for f in files if f.is_file()]


def _docs() -> dict[str, str]:
    return {str(f.relative_to(ROOT)): f.read_text() for f in _doc_files()}


# --- repository paths -----------------------------------------------------------

# A path inside the repository, as prose quotes it. Not preceded by a word
# character, a dot or a slash: `.lectr/pg` (a runtime directory),
# `../shared/bench/…` (outside the repository) and URLs are not repository
# paths.
_PATH_RE = re.compile(
    r"(?<![\w./~-])((?:tests|lectr|bench|docker|examples|migrations)/[A-Za-z0-9_./*-]*[A-Za-z0-9_*/])"
)

# Versioned labels (the vault's associated data, `lectr/wrapped-dek/v2`) are
# not paths.
_LABEL_RE = re.compile(r"lectr/[a-z-]+/v\d+")


def quoted_paths(text: str) -> set[str]:
    return {
        m.rstrip("/.") for m in _PATH_RE.findall(text) if not _LABEL_RE.fullmatch(m.rstrip("/."))
    }


def _exists(path: str) -> bool:
    if "*" in path:
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def missing_paths(docs: dict[str, str]) -> list[tuple[str, str]]:
    return sorted(
        (name, path)
        for name, text in docs.items()
        for path in quoted_paths(text)
        if not _exists(path)
    )


def test_every_quoted_repository_path_exists():
    missing = missing_paths(_docs())
    assert not missing, f"the docs quote paths that do not exist: {missing}"


def test_the_path_check_catches_a_made_up_path():
    docs = {
        "docs/x.md": "See `tests/test_no_such_file.py` and lectr/proxy/nowhere.py, and "
        "the runtime `.lectr/admin.token`, `../shared/bench/mock_upstream.rs`, the label "
        "`lectr/wrapped-dek/v2`."
    }
    assert missing_paths(docs) == [
        ("docs/x.md", "lectr/proxy/nowhere.py"),
        ("docs/x.md", "tests/test_no_such_file.py"),
    ]
    assert missing_paths({"docs/x.md": "`tests/test_docs_truth.py`, `lectr/proxy/*.py`"}) == []


# --- Python names -------------------------------------------------------------

_DOTTED_RE = re.compile(r"(?<![\w.])lectr(?:\.[A-Za-z_]\w*)+")
_TEST_REF_RE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
_TEST_NAME_RE = re.compile(r"`(test_\w+)`")


def _lectr_modules() -> set[str]:
    return {
        p.stem
        for p in (ROOT / "lectr").iterdir()
        if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").exists())
    }


def resolve(dotted: str) -> bool:
    """``lectr.a.b.C.d``: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 1, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def unresolved_names(docs: dict[str, str]) -> list[tuple[str, str]]:
    """Dotted names under a module of lectr/ (``lectr.route``, a span
    attribute, is not one) that do not resolve."""
    modules = _lectr_modules()
    bad = set()
    for name, text in docs.items():
        for dotted in set(_DOTTED_RE.findall(text)):
            if dotted.split(".")[1] in modules and not resolve(dotted):
                bad.add((name, dotted))
    return sorted(bad)


def _defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.update(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    return names


def missing_tests(docs: dict[str, str]) -> list[tuple[str, str]]:
    defined = _defined_tests()
    bad = set()
    for name, text in docs.items():
        for file, test in _TEST_REF_RE.findall(text):
            path = ROOT / file
            if not path.is_file() or not re.search(
                rf"^(?:async )?def {test}\b", path.read_text(), re.M
            ):
                bad.add((name, f"{file}::{test}"))
        for test in _TEST_NAME_RE.findall(text):
            if test not in defined and not (ROOT / "tests" / f"{test}.py").exists():
                bad.add((name, test))
    return sorted(bad)


def test_every_quoted_lectr_name_resolves():
    bad = unresolved_names(_docs())
    assert not bad, f"the docs name things lectr does not have: {bad}"


def test_every_quoted_test_exists():
    bad = missing_tests(_docs())
    assert not bad, f"the docs name tests that do not exist: {bad}"


def test_the_name_checks_catch_made_up_names():
    docs = {
        "docs/x.md": "`lectr.config.NO_SUCH_THING`, `lectr.nowhere.x`, the span attribute "
        "`lectr.route`, `lectr.config.SETTINGS`, "
        "`tests/test_docs_truth.py::test_no_such_test`, `test_invented_name`, "
        "`tests/test_docs_truth.py::test_every_quoted_test_exists`"
    }
    assert unresolved_names(docs) == [("docs/x.md", "lectr.config.NO_SUCH_THING")]
    assert missing_tests(docs) == [
        ("docs/x.md", "test_invented_name"),
        ("docs/x.md", "tests/test_docs_truth.py::test_no_such_test"),
    ]


# --- links --------------------------------------------------------------------


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2``… for repeats."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(files: dict[Path, str]) -> list[tuple[str, str]]:
    bad = []
    for path, text in files.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, mailto:
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if file and not dest.exists():
                bad.append((path.name, target))
            elif anchor and dest.suffix == ".md":
                text_of_dest = files[dest] if dest in files else dest.read_text()
                if anchor not in _anchors(text_of_dest):
                    bad.append((path.name, target))
    return bad


def test_relative_links_and_their_anchors_land():
    bad = broken_links({f: f.read_text() for f in _doc_files()})
    assert not bad, f"broken links: {bad}"


def test_the_link_check_catches_a_wrong_file_and_a_wrong_anchor():
    page = ROOT / "docs" / "x.md"
    files = {
        page: "# Top\n\n[ok](cli.md#output-and-exit-status) [self](#top) "
        "[gone](no-such.md) [anchor](cli.md#no-such-section) [web](https://example.com/x)\n"
    }
    assert broken_links(files) == [("x.md", "no-such.md"), ("x.md", "cli.md#no-such-section")]


# --- the lectr command line -----------------------------------------------------


def cli_commands() -> dict[str, set[str]]:
    """``lectr <group> [<action>]`` → its options (long and short), without
    the global ``--url``/``--json`` and hidden ones."""
    from lectr.cli import build_parser

    out: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for name, sub in subs[0].choices.items():
                walk(sub, [*words, name])
            return
        options = set()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            options.update(o for o in action.option_strings if o not in ("--url", "--json"))
        out[" ".join(words)] = options

    walk(build_parser(), ["lectr"])
    return out


def cli_table(text: str) -> dict[str, tuple[set[str], set[str]]]:
    """The command table of docs/cli.md: ``lectr <group> [<action>]`` →
    (options in the command cell, options anywhere in the row). A cell
    ``lectr orgs disable ORG` / `enable ORG`` documents both actions."""
    table: dict[str, tuple[set[str], set[str]]] = {}
    for line in text.splitlines():
        cells = (
            [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        )
        if len(cells) < 2 or not cells[0].startswith("`lectr "):
            continue
        row = re.split(r"\s\|\s", line, maxsplit=1)
        spans = re.findall(r"`([^`]+)`", row[0])
        first = spans[0].split()
        group = first[:2]
        in_row = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line))
        for i, span in enumerate(spans):
            words = span.split()
            if i == 0:
                words = words[2:]
            elif not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                continue
            action = [words[0]] if words and re.fullmatch(r"[a-z][a-z-]*", words[0]) else []
            name = " ".join(group + action)
            own = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", span))
            seen_own, seen_row = table.get(name, (set(), set()))
            table[name] = (seen_own | own, seen_row | in_row)
    return table


def cli_problems(text: str) -> list[str]:
    commands = cli_commands()
    table = cli_table(text)
    problems = []
    for name, options in sorted(commands.items()):
        if name not in table:
            problems.append(f"{name} is not in the table")
            continue
        undocumented = options - table[name][1]
        if undocumented:
            problems.append(f"{name}: {sorted(undocumented)} not documented")
    for name, (own, _) in sorted(table.items()):
        if name not in commands:
            problems.append(f"the table has {name}, which lectr does not")
        elif own - commands[name]:
            problems.append(
                f"{name}: the table gives {sorted(own - commands[name])}, which it lacks"
            )
    return problems


def test_the_cli_table_has_every_command_and_option():
    problems = cli_problems((ROOT / "docs" / "cli.md").read_text())
    assert not problems, "docs/cli.md: " + "; ".join(problems)


def test_the_cli_check_catches_a_missing_command_option_and_an_invented_one():
    text = (ROOT / "docs" / "cli.md").read_text()
    assert not cli_problems(text)
    without = "\n".join(
        line for line in text.splitlines() if not line.startswith("| `lectr keys revoke")
    )
    assert "lectr keys revoke is not in the table" in cli_problems(without)
    trimmed = text.replace("[--key-name N]", "", 1)
    assert "lectr orgs create: ['--key-name'] not documented" in cli_problems(trimmed)
    invented = text.replace("`lectr orgs show ORG`", "`lectr orgs show ORG [--verbose]`", 1)
    assert any("--verbose" in p for p in cli_problems(invented))


# --- the admin API --------------------------------------------------------------

_ADMIN_CALL_RE = re.compile(
    r"\b(GET|POST|PUT|PATCH|DELETE) (/(?:admin/|healthz|readyz|metrics)[^\s`?)]*)"
)


def _routes() -> set[tuple[str, str]]:
    from lectr.admin.app import AdminApp

    return {(op.method, op.path) for op in AdminApp.api.operations}


def _matches(template: str, path: str) -> bool:
    pattern = re.sub(r"\\\{\w+\\\}", r"(?:\\{\\w+\\}|[^/{}]+)", re.escape(template))
    return re.fullmatch(pattern, path) is not None


def unknown_calls(docs: dict[str, str]) -> list[tuple[str, str]]:
    routes = _routes()
    bad = set()
    for name, text in docs.items():
        for method, path in _ADMIN_CALL_RE.findall(text):
            path = path.rstrip(".,;:")
            if not any(m == method and _matches(t, path) for m, t in routes):
                bad.add((name, f"{method} {path}"))
    return sorted(bad)


def test_every_quoted_admin_call_is_a_route():
    bad = unknown_calls(_docs())
    assert not bad, f"the docs quote admin calls that are not routes: {bad}"


def test_admin_api_md_quotes_every_route():
    text = (ROOT / "docs" / "admin-api.md").read_text()
    quoted = {(m, p.rstrip(".,;:")) for m, p in _ADMIN_CALL_RE.findall(text)}
    missing = sorted(
        f"{m} {t}" for m, t in _routes() if not any(q == m and _matches(t, p) for q, p in quoted)
    )
    assert not missing, f"docs/admin-api.md does not describe: {missing}"


def test_the_route_check_catches_a_wrong_method_and_path():
    docs = {
        "docs/x.md": "`DELETE /admin/orgs/{org_id}`, `GET /admin/orgs/{id}/keys`, "
        "`GET /admin/orgs/$ORG/requests?limit=5`, `PATCH /admin/orgs/{id}`, `GET /admin/nothing`"
    }
    assert unknown_calls(docs) == [
        ("docs/x.md", "GET /admin/nothing"),
        ("docs/x.md", "PATCH /admin/orgs/{id}"),
    ]


def handler_statuses(fn) -> set[int]:
    """The statuses a handler's own code answers with: its replies, the
    errors it raises, and 503 for a manager this node may lack."""
    from lectr import errors

    raised = {
        name: cls.status
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, errors.LectrError)
    }
    src = inspect.getsource(fn)
    found = {int(s) for s in re.findall(r"\bReply\((\d{3})\b", src)}
    found |= {200 for _ in re.findall(r"\b(?:ok|text)\(", src)}
    found |= {201 for _ in re.findall(r"\bcreated\(", src)}
    found |= {204 for _ in re.findall(r"\bno_content\(", src)}
    found |= {raised[n] for n in re.findall(r"\braise (\w+)\(", src) if n in raised}
    if "self._need(" in src:
        found.add(503)
    return found


def test_every_status_a_handler_answers_is_in_the_openapi_document():
    from lectr.admin.app import AdminApp

    doc = AdminApp.openapi()
    problems = []
    for op in AdminApp.api.operations:
        documented = {int(s) for s in doc["paths"][op.path][op.method.lower()]["responses"]}
        extra = handler_statuses(getattr(AdminApp, op.name)) - documented
        if extra:
            problems.append(f"{op.method} {op.path}: {sorted(extra)}")
    assert not problems, "undocumented statuses: " + "; ".join(problems)


def test_the_status_check_sees_replies_and_raises():
    from lectr.admin.api import created
    from lectr.errors import Conflict

    async def handler(self, request, call):
        if call:
            raise Conflict("taken")
        self._need(None, "x")
        return created({})

    assert handler_statuses(handler) == {201, 409, 503}


# --- the error table of docs/integration.md ------------------------------------


def error_rows() -> list[dict]:
    text = (ROOT / "docs" / "integration.md").read_text()
    section = text.split("\n## Errors", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"\d{3}", cells[0]):
            openai_type, _, openai_code = cells[3].partition(" / ")

            def first(cell: str) -> str:
                return re.findall(r"`([^`]+)`", cell)[0]

            rows.append(
                {
                    "status": int(cells[0]),
                    "kind": first(cells[1]),
                    "openai_type": first(openai_type),
                    "openai_code": None if openai_code.strip() == "null" else first(openai_code),
                    "anthropic_type": first(cells[4]),
                    "openai_sdk": first(cells[5]),
                    "anthropic_sdk": first(cells[6]),
                }
            )
    return rows


def test_the_error_table_lists_every_kind_with_its_status_and_bodies():
    from lectr.providers.catalogue.anthropic import Anthropic
    from lectr.providers.catalogue.openai import OpenAI
    from lectr.providers.dialects import ERROR_STATUS

    rows = error_rows()
    assert sorted(r["kind"] for r in rows) == sorted(ERROR_STATUS)
    for row in rows:
        assert ERROR_STATUS[row["kind"]] == row["status"], row
        o = json.loads(OpenAI().error_body(row["kind"], "m"))["error"]
        assert (o["type"], o["code"]) == (row["openai_type"], row["openai_code"]), row
        a = json.loads(Anthropic().error_body(row["kind"], "m", "r"))["error"]
        assert a["type"] == row["anthropic_type"], row


def test_the_error_table_names_the_exception_each_sdk_raises():
    """What each official SDK raises for Lectr's own error bodies (the
    table gives the SDK versions it was written against)."""
    anthropic = pytest.importorskip("anthropic")
    openai = pytest.importorskip("openai")
    from openai import _base_client

    from lectr.providers.catalogue.anthropic import Anthropic
    from lectr.providers.catalogue.openai import OpenAI

    httpx = getattr(_base_client, "httpx2", None) or _base_client.httpx
    clients = {
        "openai_sdk": (openai.OpenAI(api_key="x", base_url="http://sdk.invalid/v1"), OpenAI()),
        "anthropic_sdk": (
            anthropic.Anthropic(api_key="x", base_url="http://sdk.invalid"),
            Anthropic(),
        ),
    }
    for row in error_rows():
        for column, (client, provider) in clients.items():
            body = provider.error_body(row["kind"], "m", "r")
            response = httpx.Response(
                row["status"], content=body, request=httpx.Request("POST", "http://sdk.invalid/")
            )
            error = client._make_status_error("m", body=json.loads(body), response=response)
            assert type(error).__name__ == row[column], (row["status"], row["kind"], column)


# --- request bodies the docs send to the admin API -------------------------------


def _blocks(text: str) -> list[tuple[str, str, str]]:
    """Fenced blocks: (language, body, the last prose line before them)."""
    blocks = []
    lang, lines, before, last_prose = None, [], "", ""
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines, before = line[3:].strip(), [], last_prose
            else:
                blocks.append((lang, "\n".join(lines), before))
                lang = None
        elif lang is not None:
            lines.append(line)
        elif line.strip():
            last_prose = line
    return blocks


def _commands(text: str) -> list[str]:
    """Shell commands of the fenced shell blocks, continuation lines joined."""
    out = []
    for lang, body, _ in _blocks(text):
        if lang in ("", "sh", "bash", "shell", "console"):
            out += body.replace("\\\n", " ").splitlines()
    return out


def _operation_for(method: str, url_path: str):
    from lectr.admin.app import AdminApp

    concrete = re.sub(r"\$\{[^}]*\}|\$\w+", "x", url_path)
    for op in AdminApp.api.operations:
        if op.method == method and _matches(op.path, concrete):
            return op
    return None


def admin_bodies(text: str) -> list[tuple[str, str, str]]:
    """(method, admin path, body) of every ``curl … -d '…' …/admin/…`` and
    of every ``ctx.api.put|post(path`/admin/…`, {…})`` (dashboard code)."""
    found = []
    for line in _commands(text):
        body = re.search(r"\s-d\s+'([^']*)'", line)
        url = re.search(r"(?:https?://)?[\w.-]+:\d+(/admin/[^\s\"'?]*)", line)
        if "curl" in line and body and url:
            method = re.search(r"-X\s+([A-Z]+)", line)
            found.append((method.group(1) if method else "POST", url.group(1), body.group(1)))
    for method, path, body in re.findall(
        r"ctx\.api\.(put|post)\(path`(/admin/[^`]*)`,\s*(\{.*?\})\);", text
    ):
        found.append((method.upper(), path, body))
    # "or `PUT /admin/orgs/{id}/routes/smart`:" and a JSON block
    for lang, body, before in _blocks(text):
        call = re.search(r"`(PUT|POST|PATCH) (/admin/[^`\s]*)`:\s*$", before)
        if lang == "json" and call:
            found.append((call.group(1), call.group(2), body))
    return found


def body_problems(text: str) -> list[str]:
    from lectr.admin.validation import validate
    from lectr.errors import BadRequest

    problems = []
    for method, path, body in admin_bodies(text):
        op = _operation_for(method, path)
        if op is None:
            problems.append(f"{method} {path}: no such route")
            continue
        if body.lstrip().startswith("{") and "..." in body:
            problems.append(f"{method} {path}: sends a spread object ({body})")
            continue
        try:
            doc = json.loads(body)
        except ValueError:
            # dashboard code: its top-level keys must be fields of the body
            keys = re.findall(r"[{,]\s*(\w+)\s*:", body)
            unknown = [k for k in keys if k not in (op.body or {}).get("properties", {})]
            if unknown:
                problems.append(f"{method} {path}: unknown fields {unknown}")
            continue
        try:
            validate(doc, op.body or {})
        except BadRequest as e:
            problems.append(f"{method} {path}: {e.message}")
    return problems


def test_request_bodies_in_the_docs_are_accepted_by_their_route():
    problems = []
    for name, text in _docs().items():
        problems += [f"{name}: {p}" for p in body_problems(text)]
    assert not problems, "; ".join(problems)
    assert sum(len(admin_bodies(t)) for t in _docs().values()) >= 8


def test_the_body_check_catches_unknown_fields_and_spreads():
    text = (
        "```sh\ncurl -X PUT -H 'Content-Type: application/json' \\\n"
        '     -d \'{"rpm": 600, "usd_per_week": 5}\' localhost:8081/admin/orgs/$ORG/limits\n```\n'
        "```js\nawait ctx.api.put(path`/admin/orgs/${ctx.org.id}/limits`, { ...limits, rpm: 1 });\n"
        "await ctx.api.put(path`/admin/orgs/${ctx.org.id}/limits`, { rpm: 1, org_id: 2 });\n"
        "await ctx.api.put(path`/admin/orgs/${ctx.org.id}/limits`, { rpm: rpm ? 1 : null });\n```\n"
    )
    problems = body_problems(text)
    assert len(problems) == 3, problems
    assert "usd_per_week" in problems[0]
    assert "spread" in problems[1]
    assert "org_id" in problems[2]


# --- start-up messages quoted in the docs -----------------------------------------


def config_message_problems(text: str) -> list[str]:
    """Every quoted ``lectr: configuration error: VAR is malformed: … got
    VALUE…`` is what the configuration check prints for VAR=VALUE."""
    from lectr.config import ConfigError, load_config

    problems = []
    for line in re.findall(r"lectr: configuration error: [A-Z_0-9]+ is malformed: .*", text):
        quoted = line.strip().strip("`")
        var, value = re.match(
            r"lectr: configuration error: (\w+) is malformed: .*got (\S+?)(?: |$)", quoted
        ).groups()
        try:
            load_config({}, {var: value.strip("'")})
        except ConfigError as e:
            actual = f"lectr: configuration error: {e}"
        else:
            actual = "(accepted)"
        if actual != quoted:
            problems.append(f"{quoted!r}: lectr prints {actual!r}")
    return problems


def test_quoted_configuration_errors_are_what_lectr_prints():
    problems = []
    for name, text in _docs().items():
        problems += [f"{name}: {p}" for p in config_message_problems(text)]
    assert not problems, "; ".join(problems)
    assert "configuration error: LECTR_WORKERS" in (ROOT / "docs/configuration.md").read_text()


def test_the_message_check_catches_a_changed_message():
    text = "    lectr: configuration error: LECTR_WORKERS is malformed: expected a number, got 0\n"
    assert len(config_message_problems(text)) == 1
