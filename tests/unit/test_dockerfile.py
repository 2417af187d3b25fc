"""The Dockerfile's settings: image defaults that an operator's settings file can change, and a HEALTHCHECK that
follows the admin port the server really uses.

No Docker daemon here: this reads the Dockerfile's final stage, runs the instruction that writes the image's
settings file (into a temporary folder instead of /usr/local/etc) and resolves the settings the way the container
would, then runs the HEALTHCHECK's command against a real ``meshgate serve`` started with the image's command.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshgate.cli import _serve_flags, build_parser
from meshgate.settings import SETTINGS_FILE_ENV, ServeSettings, load_settings
from tests.support.ports import free_port
from tests.support.procs import Proc

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"
LISTEN_VARIABLES = {"MESHGATE_HOST", "MESHGATE_GRPC_PORT", "MESHGATE_HTTP_PORT", "MESHGATE_ADMIN_PORT"}
POLICY = "version: 1\nrules:\n  - {name: health, public: true, match: {paths: [/healthz]}}\n"  # nothing to fetch


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def final_stage() -> list[Instruction]:
    """The instructions after the last FROM, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = pending + line, ""
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    last_from = max(index for index, item in enumerate(instructions) if item.keyword == "FROM")
    return instructions[last_from + 1 :]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for item in final_stage():
        if item.keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(item.args))  # type: ignore[misc]
    return env


def exec_form(keyword: str) -> list[str]:
    args = next(item.args for item in final_stage() if item.keyword == keyword)
    if keyword == "HEALTHCHECK":
        args = args[args.index("CMD ") + len("CMD ") :]
    parsed: list[str] = json.loads(args)
    return parsed


def image_settings_file(tmp_path: Path) -> tuple[str, Path]:
    """(where the image has its settings file, that file as the Dockerfile's RUN writes it, here)."""
    in_image = image_env()[SETTINGS_FILE_ENV]
    writer = next(item.args for item in final_stage() if item.keyword == "RUN" and in_image in item.args)
    root = tmp_path / "image"
    subprocess.run(["sh", "-c", writer.replace("/usr/local/etc", str(root / "usr/local/etc"))], check=True)
    return in_image, root / in_image.lstrip("/")


def image_settings(tmp_path: Path, environ: dict[str, str]) -> ServeSettings:
    """What ``meshgate serve`` resolves in the container: the image's command, its environment and ``environ``."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    command = [*exec_form("ENTRYPOINT"), *exec_form("CMD")]
    assert command[:2] == ["meshgate", "serve"]
    args = build_parser().parse_args(command[1:])
    flags = _serve_flags(args)
    flags["config"] = str(policy)  # the image's /etc/meshgate/policy.yaml
    return load_settings(flags, {**image_env(), **environ})


def test_the_image_sets_no_listen_setting_as_an_environment_variable() -> None:
    """Variables win over a settings file: set in the image, they would make any operator's file powerless."""
    env = image_env()
    assert not LISTEN_VARIABLES & set(env)
    assert env[SETTINGS_FILE_ENV].startswith("/usr/local/etc/")
    assert not env[SETTINGS_FILE_ENV].startswith("/etc/meshgate/")  # policy volumes are mounted there


def test_the_image_defaults_come_from_its_settings_file(tmp_path: Path) -> None:
    _, written = image_settings_file(tmp_path)
    settings = image_settings(tmp_path, {SETTINGS_FILE_ENV: str(written)})
    assert (settings.host, settings.grpc_port, settings.http_port, settings.admin_port) == ("0.0.0.0", 9001, 9002, 9090)
    exposed = next(item.args for item in final_stage() if item.keyword == "EXPOSE").split()
    assert exposed == [str(port) for port in (settings.grpc_port, settings.http_port, settings.admin_port)]


def test_an_operators_settings_file_changes_them_and_variables_still_win(tmp_path: Path) -> None:
    _, written = image_settings_file(tmp_path)
    written.write_text("host: 0.0.0.0\nadmin_port: 9191\ngrpc_port: 7001\n")  # mounted over the image's
    settings = image_settings(tmp_path, {SETTINGS_FILE_ENV: str(written)})
    assert (settings.host, settings.grpc_port, settings.http_port, settings.admin_port) == ("0.0.0.0", 7001, 9002, 9191)

    elsewhere = tmp_path / "mine.yaml"  # or MESHGATE_SETTINGS pointed at another file
    elsewhere.write_text("host: 0.0.0.0\nadmin_port: 8080\n")
    assert image_settings(tmp_path, {SETTINGS_FILE_ENV: str(elsewhere)}).admin_port == 8080

    with_variable = {SETTINGS_FILE_ENV: str(elsewhere), "MESHGATE_ADMIN_PORT": "9292"}
    assert image_settings(tmp_path, with_variable).admin_port == 9292


def test_the_healthcheck_follows_the_admin_port_the_server_really_uses(tmp_path: Path) -> None:
    """The image's command serves with an operator's settings file; the HEALTHCHECK's command finds its port."""
    healthcheck = exec_form("HEALTHCHECK")
    assert healthcheck == ["meshgate", "healthcheck"]
    in_image, _ = image_settings_file(tmp_path)
    admin_port = free_port()
    operators = tmp_path / "operator.yaml"  # loopback only, as every test here
    operators.write_text(f"host: 127.0.0.1\ngrpc_port: 0\nhttp_port: -1\nadmin_port: {admin_port}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    command = [*exec_form("ENTRYPOINT"), *exec_form("CMD")]
    command = [
        sys.executable,
        "-m",
        *[str(policy) if part == "/etc/meshgate/policy.yaml" else part for part in command],
    ]
    check = [sys.executable, "-m", *healthcheck]  # PID 1 is not ours here: name the server

    with Proc(command, env={**image_env(), SETTINGS_FILE_ENV: str(operators)}, name="image-cmd") as server:
        server.wait_for_port(admin_port, timeout=30)
        # The check's own environment is the image's: its MESHGATE_SETTINGS names the image's file, which is not
        # what the server was given (and does not even exist here).
        assert not Path(in_image).exists()
        done = subprocess.run(
            [*check, "--pid", str(server.pid)],
            env={**image_env(), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"127.0.0.1:{admin_port}/healthz" in done.stdout
        pid = server.pid
        assert server.stop(timeout=15, sig=signal.SIGTERM) == 0

    done = subprocess.run(
        [*check, "--pid", str(pid)], capture_output=True, text=True, timeout=30, check=False, env=image_env()
    )
    assert done.returncode == 1  # gone: unhealthy


@pytest.mark.parametrize("keyword", ["ENTRYPOINT", "CMD", "HEALTHCHECK"])
def test_exec_forms(keyword: str) -> None:
    """Exec form everywhere: meshgate is PID 1 and gets SIGTERM itself, no shell in between."""
    assert exec_form(keyword)
