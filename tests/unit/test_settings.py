from pathlib import Path

import pytest

from meshgate.settings import SettingsError, load_settings


def test_flags_win_over_env_and_defaults(tmp_path: Path) -> None:
    config = tmp_path / "policy.yaml"
    config.write_text("version: 1\n")
    env = {"MESHGATE_GRPC_PORT": "7000", "MESHGATE_ADMIN_PORT": "7001", "MESHGATE_CONFIG": str(config)}
    settings = load_settings({"service": "extauthz", "grpc_port": 0}, env)
    assert settings.grpc_port == 0  # flag
    assert settings.admin_port == 7001  # env
    assert settings.http_port == 9002  # default
    assert settings.config == config
    assert settings.env_names["grpc_port"] == "MESHGATE_GRPC_PORT"


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({}, {}, "a service is required"),
        ({"service": "extauthz"}, {}, "--config / MESHGATE_CONFIG is required"),
        ({"service": "nope", "config": "."}, {}, "unknown service 'nope'"),
        (
            {"service": "extauthz", "config": "."},
            {"MESHGATE_GRPC_PORT": "x"},
            "--grpc-port / MESHGATE_GRPC_PORT",
        ),
        ({"service": "extauthz", "config": ".", "grpc_port": 70000}, {}, "70000 is not a port"),
        ({"service": "extauthz", "config": ".", "admin_port": -2}, {}, "-2 is not a port"),
        ({"service": "extauthz", "config": ".", "log_level": "loud"}, {}, "--log-level"),
        ({"service": "extauthz", "config": ".", "drain_s": 0}, {}, "MESHGATE_DRAIN_S: must be positive"),
        (
            {"service": "extauthz", "config": "."},
            {"MESHGATE_SHUTDOWN_DELAY_S": "-1"},
            "--shutdown-delay-seconds / MESHGATE_SHUTDOWN_DELAY_S: must be 0 or more",
        ),
        ({"service": "extauthz", "config": "/does/not/exist"}, {}, "does not exist"),
    ],
)
def test_bad_settings_are_explained(flags: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(flags, env)


def test_ratelimit_options_parse_from_env(tmp_path: Path) -> None:
    env = {"MESHGATE_SHADOW_MODE": "on", "MESHGATE_RATELIMIT_HEADERS": "both", "MESHGATE_NEAR_LIMIT_RATIO": "0.5"}
    settings = load_settings({"service": "ratelimit", "config": str(tmp_path), "backend_timeout_s": 0.2}, env)
    assert settings.shadow_mode is True
    assert settings.ratelimit_headers == "both"
    assert settings.near_limit_ratio == 0.5
    assert settings.backend_timeout_s == 0.2
    with pytest.raises(SettingsError, match="MESHGATE_SHADOW_MODE"):
        load_settings({"service": "ratelimit", "config": str(tmp_path)}, {"MESHGATE_SHADOW_MODE": "perhaps"})


def test_a_settings_file_sits_under_env_and_flags(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("version: 1\n")
    settings_file = tmp_path / "meshgate.yaml"
    settings_file.write_text(
        "config: policy.yaml          # relative to this file\n"
        "grpc_port: 7100\n"
        "admin_port: 7101\n"
        "deadline_s: 0.4\n"
        "shadow_mode: true\n"
        "host: 0.0.0.0\n"
    )
    env = {"MESHGATE_SETTINGS": str(settings_file), "MESHGATE_ADMIN_PORT": "7201"}
    settings = load_settings({"service": "extauthz", "host": "127.0.0.1"}, env)
    assert settings.config == tmp_path / "policy.yaml"
    assert settings.grpc_port == 7100 and settings.deadline_s == 0.4 and settings.shadow_mode is True  # file
    assert settings.admin_port == 7201  # env wins over the file
    assert settings.host == "127.0.0.1"  # a flag wins over both
    flagged = load_settings({"service": "extauthz", "settings": str(settings_file)}, {})
    assert flagged.grpc_port == 7100 and flagged.admin_port == 7101
    # YAML reads a bare off as false: a choice setting takes it as the word it was
    settings_file.write_text("config: policy.yaml\nratelimit_headers: off\ngrpc_port: 70000\n")
    quiet = load_settings({"service": "ratelimit", "settings": str(settings_file), "grpc_port": 9001}, {})
    assert quiet.ratelimit_headers == "off" and quiet.grpc_port == 9001  # a flag replaces the file's bad port
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SettingsError, match="--config / MESHGATE_CONFIG is required"):
        load_settings({"service": "extauthz", "settings": str(tmp_path / "empty.yaml")}, {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config: /\ngrpc_prot: 1\n", ":2: unknown setting 'grpc_prot'"),
        ("config: /\n\ngrpc_port: many\n", ":3: --grpc-port / MESHGATE_GRPC_PORT: expected int"),
        ("grpc_port: [1, 2]\n", ":1: grpc_port: expected int"),
        ("grpc_port: true\n", ":1: grpc_port: expected int, got True"),
        ("grpc_port: 9001.9\n", ":1: grpc_port: expected int, got 9001.9"),
        ("deadline_s: yes\n", ":1: deadline_s: expected float, got True"),
        ("config: p.yaml\ngrpc_port: 70000\n", ":1: --config: "),  # relative to the file, which lacks it
        ("config: /\n\nadmin_port: 70000\n", ":3: --admin-port / MESHGATE_ADMIN_PORT: 70000 is not a port"),
        ("config: /\nratelimit_headers: sometimes\n", ":2: --ratelimit-headers / MESHGATE_RATELIMIT_HEADERS"),
        ("- a\n- b\n", "expected a mapping of settings"),
        ("a: [\n", "invalid YAML"),
    ],
)
def test_bad_settings_files_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    settings_file = tmp_path / "meshgate.yaml"
    settings_file.write_text(text)
    with pytest.raises(SettingsError) as caught:
        load_settings({"service": "extauthz", "settings": str(settings_file)}, {})
    assert str(settings_file) in str(caught.value) and message in str(caught.value)
    with pytest.raises(SettingsError, match=r"cannot read: .*No such file"):
        load_settings({"service": "extauthz", "settings": str(tmp_path / "missing.yaml")}, {})
