"""The shared /v1 admin API: status and reload over a real ConfigWatcher, the loopback guard, errors, OpenAPI."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from meshgate.admin import build_admin_app
from meshgate.admin_api import is_loopback, local_router, v1_router
from meshgate.reload import ConfigWatcher, content_digest, fingerprint
from meshgate.runtime import Readiness
from meshgate.settings import SettingsError, load_settings
from meshgate.yamlconf import ConfigError, load

INFO = {"name": "meshgate", "version": "1.2.3", "service": "ratelimit"}
_IDS = itertools.count()


def _load(path: Path) -> int:
    data = load(path)
    if not isinstance(data, dict) or not isinstance(data.get("value"), int):
        raise ConfigError(str(path), 2, "value: expected an integer")
    return int(data["value"])


class Served:
    """A watcher over ``config.yaml`` (``value: <int>``) and the admin app that serves /v1 for it."""

    def __init__(self, folder: Path, *, allow_remote: bool = False) -> None:
        self.path = folder / "config.yaml"
        self.path.write_text("value: 1\n")
        self.swapped: list[int] = []
        self.watcher: ConfigWatcher[int] = ConfigWatcher(
            lambda: _load(self.path),
            lambda _current: [self.path],
            self._on_swap,
            component=f"apitest{next(_IDS)}",
        )
        self.watcher.load_initial()
        self.readiness = Readiness()
        self.readiness.set("config", True)
        self.app = build_admin_app(
            self.readiness, INFO, [v1_router(INFO, self.readiness, self.watcher, allow_remote=allow_remote)]
        )

    async def _on_swap(self, value: int) -> None:
        self.swapped.append(value)

    def write(self, text: str) -> None:
        self.path.write_text(text)


def client(app: FastAPI, host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://admin")


@pytest.fixture
def served(tmp_path: Path) -> Served:
    return Served(tmp_path)


async def test_status_names_the_service_readiness_and_the_config(served: Served) -> None:
    async with client(served.app, "10.1.2.3") as http:  # read-only: anyone may ask
        answer = await http.get("/v1/status")
    assert answer.status_code == 200
    body = answer.json()
    assert (body["service"], body["version"], body["ready"], body["draining"]) == ("ratelimit", "1.2.3", True, False)
    assert body["checks"] == {"config": True}
    assert body["uptime_s"] >= 0
    config = body["config"]
    assert config["paths"] == [str(served.path)]
    assert config["generation"] == 1
    assert config["digest"] == content_digest(fingerprint([served.path]))
    assert config["last_reload"]["ok"] is True and config["last_reload"]["error"] is None
    served.readiness.start_draining()
    async with client(served.app) as http:
        body = (await http.get("/v1/status")).json()
    assert (body["ready"], body["draining"]) == (False, True)


async def test_reload_good_then_bad_then_unchanged_bad_then_good(served: Served) -> None:
    async with client(served.app) as http:
        unchanged = await http.post("/v1/reload")
        assert unchanged.status_code == 200
        assert unchanged.json()["changed"] is False and unchanged.json()["config"]["generation"] == 1
        first_digest = unchanged.json()["config"]["digest"]

        served.write("value: 2\n")
        good = await http.post("/v1/reload")
        assert good.status_code == 200
        assert good.json()["changed"] is True
        assert good.json()["config"]["generation"] == 2
        assert good.json()["config"]["digest"] != first_digest
        assert served.watcher.current == 2

        served.write("value: nope\n")
        bad = await http.post("/v1/reload")
        assert bad.status_code == 422
        assert bad.json()["error"] == {
            "code": "invalid_config",
            "message": f"{served.path}:2: value: expected an integer",
        }
        assert bad.json()["config"]["generation"] == 2  # the good one keeps serving
        assert served.watcher.current == 2
        # Asked again without a change: the files on disk are still the rejected ones.
        again = await http.post("/v1/reload")
        assert again.status_code == 422
        status = (await http.get("/v1/status")).json()["config"]
        assert status["generation"] == 2
        assert status["last_reload"]["ok"] is False
        assert status["last_reload"]["error"].startswith(f"{served.path}:2:")

        served.write("value: 3\n")
        fixed = await http.post("/v1/reload")
        assert fixed.status_code == 200 and fixed.json()["config"]["generation"] == 3
    assert served.swapped == [2, 3]


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("127.0.0.6", False),  # Istio's inbound passthrough: any pod of the mesh
        ("::ffff:127.0.0.6", False),
        ("10.0.0.7", False),
        ("192.168.1.1", False),
        ("fe80::1", False),
        ("testclient", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(host: str | None, local: bool) -> None:
    assert is_loopback(host) is local


async def test_reload_refuses_remote_clients_naming_the_setting(served: Served) -> None:
    served.write("value: 5\n")
    for host in ("10.0.0.7", "127.0.0.6"):
        async with client(served.app, host) as http:
            answer = await http.post("/v1/reload")
        assert answer.status_code == 403
        error = answer.json()["error"]
        assert error["code"] == "forbidden"
        assert "admin_allow_remote" in error["message"] and "MESHGATE_ADMIN_ALLOW_REMOTE" in error["message"]
    assert served.watcher.current == 1  # nothing was reloaded


async def test_reload_answers_remote_clients_when_allowed(tmp_path: Path) -> None:
    served = Served(tmp_path, allow_remote=True)
    served.write("value: 7\n")
    async with client(served.app, "10.0.0.7") as http:
        answer = await http.post("/v1/reload")
    assert answer.status_code == 200 and answer.json()["config"]["generation"] == 2


async def test_errors_are_json_everywhere(served: Served) -> None:
    router = local_router(allow_remote=False)

    @router.get("/boom")
    async def boom() -> dict[str, Any]:
        raise RuntimeError("a bug")

    app = build_admin_app(served.readiness, INFO, [router])
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
        missing = await http.get("/v1/nope")
        wrong_method = await http.delete("/v1/boom")
        crashed = await http.get("/v1/boom")
    assert missing.status_code == 404 and missing.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "GET"
    assert crashed.status_code == 500
    assert crashed.json() == {"error": {"code": "internal_error", "message": "internal error"}}


async def test_openapi_lists_the_routes_with_summaries_and_models(served: Served) -> None:
    async with client(served.app) as http:
        schema = (await http.get("/openapi.json")).json()
    status = schema["paths"]["/v1/status"]["get"]
    reload = schema["paths"]["/v1/reload"]["post"]
    assert status["summary"] and reload["summary"]
    assert status["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StatusOut"
    }
    assert reload["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ReloadOut"
    }
    assert set(reload["responses"]) >= {"200", "403", "422"}
    assert {"StatusOut", "ReloadOut", "ReloadFailedOut", "ErrorBody", "ConfigOut"} <= set(
        schema["components"]["schemas"]
    )


def test_content_digest_follows_contents_not_inodes(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a.yaml").write_text("value: 1\n")
    (two / "a.yaml").write_text("value: 1\n")
    assert content_digest(fingerprint([one])) == content_digest(fingerprint([two]))
    (two / "a.yaml").write_text("value: 2\n")
    assert content_digest(fingerprint([one])) != content_digest(fingerprint([two]))
    (two / "a.yaml").rename(two / "b.yaml")
    (two / "b.yaml").write_text("value: 1\n")
    assert content_digest(fingerprint([one])) != content_digest(fingerprint([two]))  # a renamed file differs
    assert content_digest(fingerprint([tmp_path / "missing"])).startswith("sha256:")


def test_admin_allow_remote_setting(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("value: 1\n")
    flags: dict[str, Any] = {"service": "extauthz", "config": str(tmp_path / "c.yaml")}
    assert load_settings(flags, {}).admin_allow_remote is False
    assert load_settings(flags, {"MESHGATE_ADMIN_ALLOW_REMOTE": "true"}).admin_allow_remote is True
    assert (
        load_settings({**flags, "admin_allow_remote": False}, {"MESHGATE_ADMIN_ALLOW_REMOTE": "1"}).admin_allow_remote
        is False
    )
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text("admin_allow_remote: yes\n")
    assert load_settings({**flags, "settings": str(settings_file)}, {}).admin_allow_remote is True
    with pytest.raises(SettingsError, match="MESHGATE_ADMIN_ALLOW_REMOTE: expected bool"):
        load_settings(flags, {"MESHGATE_ADMIN_ALLOW_REMOTE": "maybe"})
    settings_file.write_text("admin_allow_remote: 3\n")
    with pytest.raises(SettingsError, match=r"settings.yaml:1: .*MESHGATE_ADMIN_ALLOW_REMOTE: expected bool, got 3"):
        load_settings({**flags, "settings": str(settings_file)}, {})


async def test_status_withholds_a_rejected_configs_error_from_remote_clients(served: Served) -> None:
    served.write("value: secret-looking\n")
    assert not await served.watcher.check_now()
    async with client(served.app, "10.0.0.7") as http:
        remote = (await http.get("/v1/status")).json()["config"]["last_reload"]
    async with client(served.app) as http:
        local = (await http.get("/v1/status")).json()["config"]["last_reload"]
    assert remote["ok"] is False and local["ok"] is False
    assert "config.yaml:2" not in remote["error"] and "loopback" in remote["error"]
    assert "config.yaml:2: value: expected an integer" in local["error"]


def test_content_digest_leaves_hidden_files_out(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        (folder / "a.yaml").write_text("value: 1\n")
    (two / ".a.yaml.swp").write_bytes(b"\0" * 4096)  # an editor's swap file: no config
    assert content_digest(fingerprint([one])) == content_digest(fingerprint([two]))


async def test_the_digest_is_of_the_version_loaded_not_of_a_later_one(tmp_path: Path) -> None:
    # A write that lands while the load runs (and is then rejected) must not become the served config's digest.
    path = tmp_path / "config.yaml"
    path.write_text("value: 1\n")
    writes: list[str] = []

    def load_then_overwrite() -> int:
        value = _load(path)
        if writes:
            path.write_text(writes.pop())
        return value

    async def swapped(_value: int) -> None:
        return None

    watcher: ConfigWatcher[int] = ConfigWatcher(
        load_then_overwrite, lambda _current: [path], swapped, component=f"apitest{next(_IDS)}"
    )
    watcher.load_initial()
    served_digest = watcher.status().digest
    path.write_text("value: 2\n")
    writes.append("value: broken\n")
    assert await watcher.check_now()  # loads 2; "broken" lands meanwhile
    assert watcher.current == 2
    loaded_two = watcher.status().digest
    assert not await watcher.check_now()  # "broken" is rejected
    assert watcher.status().digest == loaded_two != served_digest
    path.write_text("value: 2\n")
    assert loaded_two == content_digest(fingerprint([path]))


def test_content_digest_ignores_the_order_files_are_listed_in(tmp_path: Path) -> None:
    # Replicas that started with a config and reloaded into it from another order must agree.
    (tmp_path / "policy.yaml").write_text("a\n")
    (tmp_path / "keys.yaml").write_text("b\n")
    one = [tmp_path / "policy.yaml", tmp_path / "keys.yaml"]
    assert content_digest(fingerprint(one)) == content_digest(fingerprint(list(reversed(one))))


def test_content_digest_counts_a_hidden_file_the_config_names_and_skips_hidden_folders(tmp_path: Path) -> None:
    named = tmp_path / ".policy.yaml"  # --config .policy.yaml: the config itself
    named.write_text("value: 1\n")
    first = content_digest(fingerprint([named]))
    named.write_text("value: 2\n")
    assert content_digest(fingerprint([named])) != first

    folder = tmp_path / "descriptors"
    folder.mkdir()
    (folder / "shop.yaml").write_text("domain: shop\n")
    clean = content_digest(fingerprint([folder]))
    (folder / ".old").mkdir()
    (folder / ".old" / "shop.yaml").write_text("domain: stale\n")  # a hidden folder: no config
    assert content_digest(fingerprint([folder])) == clean


def test_content_digest_reads_a_configmaps_files(tmp_path: Path) -> None:
    # Kubernetes: the visible names are symlinks into ..data, itself a symlink to a ..<timestamp> folder.
    mount = tmp_path / "mount"
    (mount / "..2026_12_08_v1").mkdir(parents=True)
    (mount / "..2026_12_08_v1" / "shop.yaml").write_text("domain: shop\n")
    (mount / "..data").symlink_to("..2026_12_08_v1")
    (mount / "shop.yaml").symlink_to("..data/shop.yaml")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "shop.yaml").write_text("domain: shop\n")
    assert content_digest(fingerprint([mount])) == content_digest(fingerprint([plain]))
    (mount / "..2026_12_08_v1" / "shop.yaml").write_text("domain: other\n")
    assert content_digest(fingerprint([mount])) != content_digest(fingerprint([plain]))
