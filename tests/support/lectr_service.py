"""An in-process Lectr for integration tests: the real LectrService (all of
start-up, real ports on 127.0.0.1, the test's own database), without twistd."""

from __future__ import annotations

from dataclasses import replace

from twisted.internet import reactor

from lectr.config import load_config
from lectr.service import Components, LectrService
from tests.support.process import new_master_key


async def start_lectr(db_url: str, tmp_path, fake=None, **env: str) -> LectrService:
    """Start Lectr on ``db_url``; ``fake`` (a FakeProviderServer) becomes
    both providers' origin. Extra settings as environment variables."""
    environ = {
        "DATABASE_URL": db_url,
        "ENCRYPTION_KEY": new_master_key(),
        "LECTR_PROXY_LISTEN": "tcp:0:interface=127.0.0.1",
        "LECTR_ADMIN_LISTEN": "tcp:0:interface=127.0.0.1",
        "LECTR_DATA_DIR": str(tmp_path / "lectr-data"),
        "LECTR_ADMIN_TOKEN": "test-admin-token-0123456789",
        "LECTR_DB_POOL_MIN": "1",
        "LECTR_DB_POOL_MAX": "5",
        "LECTR_SHUTDOWN_GRACE": "2",
    }
    if fake is not None:
        environ["LECTR_OPENAI_BASE_URL"] = fake.openai_base_url
        environ["LECTR_ANTHROPIC_BASE_URL"] = fake.anthropic_base_url
    environ.update(env)
    config = load_config({}, environ)
    (tmp_path / "lectr-data").mkdir(exist_ok=True)
    service = LectrService(replace(config), reactor=reactor, exit_on_failure=False, freeze_gc=False)
    service.running = True
    await service.start()
    return service


def proxy_url(service: LectrService, path: str = "") -> str:
    c: Components = service.components
    return f"http://127.0.0.1:{c.proxy_port.port.getHost().port}{path}"


def admin_url(service: LectrService, path: str = "") -> str:
    c: Components = service.components
    return f"http://127.0.0.1:{c.admin_port.port.getHost().port}{path}"
