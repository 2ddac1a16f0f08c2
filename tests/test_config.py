"""Settings: precedence, validation, and secrets kept out of messages."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lectr.config import (
    SETTINGS,
    ConfigError,
    load_config,
    parse_master_key,
    redact_url,
    usable_cores,
)
from lectr.devmode import apply_development_defaults

KEY = base64.b64encode(os.urandom(32)).decode()


def test_defaults_are_design_defaults():
    c = load_config({}, {})
    assert c.proxy_listen == "tcp:8080"
    assert c.admin_listen == "tcp:8081:interface=127.0.0.1"
    assert c.database_url is None and c.embedded_database
    assert (c.db_pool_min, c.db_pool_max, c.workers) == (2, 10, 1)
    assert c.max_body_bytes == 33554432
    assert c.openai_base_url == "https://api.openai.com"
    assert c.no_migrate is False


def test_command_line_wins_over_environment():
    env = {"LECTR_PROXY_LISTEN": "tcp:9000", "LECTR_DB_POOL_MAX": "20"}
    c = load_config({"proxy_listen": "tcp:9100"}, env)
    assert c.proxy_listen == "tcp:9100"
    assert c.db_pool_max == 20


def test_no_migrate_flag_and_env():
    assert load_config({"no_migrate": True}, {}).no_migrate is True
    assert load_config({}, {"LECTR_NO_MIGRATE": "1"}).no_migrate is True
    assert load_config({}, {"LECTR_NO_MIGRATE": "0"}).no_migrate is False
    with pytest.raises(ConfigError, match="LECTR_NO_MIGRATE"):
        load_config({}, {"LECTR_NO_MIGRATE": "maybe"})


def test_workers_auto():
    assert load_config({}, {"LECTR_WORKERS": "auto"}).workers == usable_cores()
    with pytest.raises(ConfigError, match="--workers"):
        load_config({"workers": "0"}, {})
    with pytest.raises(ConfigError, match="or auto"):
        load_config({"workers": "many"}, {})


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # docker run --cpus 2 (cgroup v2)
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),  # no quota
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_workers_auto_follows_a_container_cpu_quota(tmp_path, files, cores):
    """``auto`` is one process per core the container may use, not per core
    of the host: a CPU quota (cgroup v2 or v1) bounds the affinity's count."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if cores is None else min(affinity, cores)
    assert usable_cores(tmp_path) == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@db.example:5432/lectr",
        "postgres://u@db/lectr?sslmode=require",
        "postgresql://u@/lectr?host=/var/run/postgresql",
        "postgresql://u@%2Fvar%2Frun%2Fpostgresql/lectr",
        "postgresql:///lectr?host=/tmp&port=5433&sslmode=verify-full&sslrootcert=/ca.pem",
    ],
)
def test_database_urls_accepted(url):
    assert load_config({}, {"DATABASE_URL": url, "ENCRYPTION_KEY": KEY}).database_url == url


@pytest.mark.parametrize(
    "url", ["mysql://u:pw@x/db", "db.example:5432", "postgresql://u:pw@host:notaport/db"]
)
def test_malformed_database_url_names_the_setting_not_the_password(url):
    with pytest.raises(ConfigError) as info:
        load_config({}, {"DATABASE_URL": url, "ENCRYPTION_KEY": KEY})
    assert "DATABASE_URL is malformed" in str(info.value)
    assert "pw@" not in str(info.value)


def test_database_url_requires_encryption_key():
    with pytest.raises(ConfigError, match="ENCRYPTION_KEY is required"):
        load_config({}, {"DATABASE_URL": "postgresql://u@h/db"})


@pytest.mark.parametrize("bad", ["short", base64.b64encode(b"x" * 16).decode(), "!!!!"])
def test_malformed_encryption_key(bad):
    with pytest.raises(ConfigError) as info:
        load_config({}, {"ENCRYPTION_KEY": bad})
    assert "ENCRYPTION_KEY is malformed" in str(info.value)
    assert bad not in str(info.value)


def test_encryption_key_is_kept_secret():
    c = load_config({}, {"ENCRYPTION_KEY": KEY, "LECTR_ADMIN_TOKEN": "t" * 32})
    assert len(c.encryption_key.reveal()) == 32
    assert KEY not in repr(c) and "t" * 32 not in repr(c)
    urlsafe = base64.urlsafe_b64encode(b"\xfb" * 32).decode()
    assert load_config({}, {"ENCRYPTION_KEY": urlsafe}).encryption_key.reveal() == b"\xfb" * 32


def test_new_key_must_differ():
    with pytest.raises(ConfigError, match="same key"):
        load_config({}, {"ENCRYPTION_KEY": KEY, "ENCRYPTION_KEY_NEW": KEY})


def test_pool_bounds():
    with pytest.raises(ConfigError, match="LECTR_DB_POOL_MIN"):
        load_config({"db_pool_min": "5", "db_pool_max": "2"}, {})


def test_base_urls():
    c = load_config({}, {"LECTR_ANTHROPIC_BASE_URL": "http://127.0.0.1:9000/anthropic/"})
    assert c.anthropic_base_url == "http://127.0.0.1:9000/anthropic"
    for bad in ("ftp://x", "http://u:p@h", "http://h/?q=1"):
        with pytest.raises(ConfigError, match="LECTR_OPENAI_BASE_URL"):
            load_config({}, {"LECTR_OPENAI_BASE_URL": bad})
    # a prefix that merely contains v1 is fine
    c = load_config({}, {"LECTR_OPENAI_BASE_URL": "https://egress.example/v1/openai"})
    assert c.openai_base_url == "https://egress.example/v1/openai"


@pytest.mark.parametrize(
    "env, url, fixed",
    [
        ("LECTR_OPENAI_BASE_URL", "https://api.openai.com/v1", "https://api.openai.com"),
        ("LECTR_OPENAI_BASE_URL", "https://api.openai.com/v1/", "https://api.openai.com"),
        ("LECTR_OPENAI_BASE_URL", "https://api.openai.com/V1", "https://api.openai.com"),
        (
            "LECTR_ANTHROPIC_BASE_URL",
            "http://10.0.0.5:8000/anthropic/v1",
            "http://10.0.0.5:8000/anthropic",
        ),
    ],
)
def test_a_provider_base_url_ending_in_v1_is_refused_with_the_fix(env, url, fixed):
    with pytest.raises(ConfigError) as refused:
        load_config({}, {env: url})
    message = str(refused.value)
    assert message.startswith(env)
    assert "ends in /v1" in message and f"set it to {fixed!r}" in message
    assert load_config({}, {env: fixed})  # and the fix is accepted


def test_oidc_settings():
    c = load_config({}, {"AUTH0_DOMAIN": "acme.eu.auth0.com", "AUTH0_AUDIENCE": "https://api"})
    assert c.oidc.issuer == "https://acme.eu.auth0.com/"
    assert c.oidc.jwks_url == "https://acme.eu.auth0.com/.well-known/jwks.json"
    assert c.oidc.audience == "https://api"
    c = load_config({}, {"LECTR_OIDC_ISSUER": "https://kc/realms/x", "LECTR_OIDC_AUDIENCE": "a"})
    assert c.oidc.jwks_url == "https://kc/realms/x/.well-known/jwks.json"
    with pytest.raises(ConfigError, match="audience"):
        load_config({}, {"LECTR_OIDC_ISSUER": "https://kc"})
    # the dashboard's client id rides along (no client id: no OIDC sign-in in the dashboard)
    assert c.oidc.client_id is None
    auth0 = {"AUTH0_DOMAIN": "acme.eu.auth0.com", "AUTH0_AUDIENCE": "https://api"}
    c = load_config({}, {**auth0, "LECTR_OIDC_CLIENT_ID": " spa-client "})
    assert c.oidc.client_id == "spa-client"
    assert load_config({}, {**auth0, "LECTR_OIDC_CLIENT_ID": "  "}).oidc.client_id is None


def test_redact_url():
    assert redact_url("postgresql://u:secret@h:5/db?sslmode=require") == (
        "postgresql://u:***@h:5/db?sslmode=require"
    )
    assert "secret" not in redact_url("postgresql://u@h/db?password=secret&x=1")


def test_every_setting_has_an_env_var_and_help():
    envs = [s.env for s in SETTINGS]
    assert len(envs) == len(set(envs))
    assert all(s.help for s in SETTINGS)


def test_development_defaults_generate_private_files(tmp_path):
    import io
    import stat

    c = load_config({"data_dir": str(tmp_path / "d")}, {})
    out = io.StringIO()
    dev = apply_development_defaults(c, out)
    assert dev.development_mode
    token = (tmp_path / "d" / "admin.token").read_text().strip()
    assert dev.admin_token.reveal() == token
    assert f"(shown once): {token}" in out.getvalue()
    for name in ("admin.token", "encryption.key"):
        assert stat.S_IMODE((tmp_path / "d" / name).stat().st_mode) == 0o600
    out2 = io.StringIO()
    again = apply_development_defaults(c, out2)
    assert again.encryption_key == dev.encryption_key
    assert token not in out2.getvalue()


def test_no_development_defaults_with_database_url(tmp_path):
    c = load_config(
        {"data_dir": str(tmp_path)}, {"DATABASE_URL": "postgresql://u@h/d", "ENCRYPTION_KEY": KEY}
    )
    assert apply_development_defaults(c) is c
    assert not (tmp_path / "admin.token").exists()


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32), junk=st.sampled_from("!@#$^&*()[]{}<>?;:'\",.~`| \t")
)
def test_a_master_key_with_a_stray_character_is_refused(key, junk):
    """Standard and URL-safe base64 of 32 bytes are accepted; the same with
    a character of neither alphabet anywhere is refused, not decoded with
    the character silently dropped (a typo would then be a different key)."""
    for text in (base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()):
        assert parse_master_key(text).reveal() == key
        stray = text[:10] + junk + text[10:]
        if junk.isspace():
            continue  # (inside: still refused; at the ends it is trimmed)
        with pytest.raises(ValueError, match="base64"):
            parse_master_key(stray)
