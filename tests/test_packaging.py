"""Packaging invariants that, when broken, hide the plugin or the migrations."""

from __future__ import annotations

import configparser
import subprocess
import sys

from tests.support.process import REPO


def _listed_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}


def test_every_package_directory_is_listed_in_setup_cfg():
    found = {"twisted.plugins", "lectr.migrations", "lectr.migrations.versions"}
    for init in (REPO / "lectr").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(REPO).parts))
    assert _listed_packages() == found


def test_no_init_in_twisted_plugins():
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()


def test_plugin_discovery_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "names = [p.tapname for p in getPlugins(IServiceMaker)]\n"
        "assert 'lectr' in names, names\n"
        "heavy = [m for m in ('twisted.internet.reactor', 'treq', 'lectr.service', 'psycopg2')\n"
        "         if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_twistd_help_documents_every_setting():
    from lectr.config import SETTINGS

    out = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "lectr", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for s in SETTINGS:
        assert s.env in out, s.env
        if s.option:
            assert f"--{s.option}" in out
