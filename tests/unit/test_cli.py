"""The `meshgate` command's own paths (serve itself is exercised end to end in tests/e2e)."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from extauthz.identity.apikey import hash_api_key
from meshgate.cli import main
from meshgate.devservers.service import ServiceProcess
from tests.support.http import get

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "policies"


def test_validate_good_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(FIXTURES / "example.yaml")]) == 0
    assert "ok (extauthz policy; identity providers: jwt, api_key, spiffe)" in capsys.readouterr().out


def test_validate_bad_policy_names_file_and_line(capsys: pytest.CaptureFixture[str]) -> None:
    bad = FIXTURES / "invalid" / "alg_none.yaml"
    assert main(["validate", str(FIXTURES / "example.yaml"), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:11: algorithms: 'none' is never accepted" in err


def test_validate_api_keys_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = FIXTURES / "api-keys.yaml"
    assert main(["validate", str(keys)]) == 0
    assert f"{keys}: ok (api keys file; " in capsys.readouterr().out
    bad = tmp_path / "keys.yaml"
    bad.write_text("clients:\n  - client: a\n    keys:\n      - {id: k1, sha256: nothex}\n")
    assert main(["validate", str(bad)]) == 1
    assert f"{bad}:4: sha256: expected 64 hex digits" in capsys.readouterr().err


def test_validate_ratelimit_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    descriptors = tmp_path / "config.yaml"
    descriptors.write_text("domain: shop\ndescriptors: []\n")
    assert main(["validate", str(descriptors), str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{descriptors}: ok (ratelimit config; domains: shop)" in out
    assert f"{tmp_path}: ok (ratelimit config; domains: shop)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: other\ndescriptors:\n  - key: k\n    nope: 1\n")
    assert main(["validate", str(tmp_path)]) == 1
    assert f"{bad}:4:" in capsys.readouterr().err


def test_serve_reads_a_settings_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings_file = tmp_path / "meshgate.yaml"
    settings_file.write_text("config: policy.yaml\ngrpc_port: nine\n")
    assert main(["serve", "extauthz", "--settings", str(settings_file)]) == 2
    assert f"settings file {settings_file}:2: --grpc-port / MESHGATE_GRPC_PORT" in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    policy = tmp_path / "policy.yaml"  # no issuer to fetch keys from: nothing leaves loopback
    policy.write_text("version: 1\nrules:\n  - {name: health, public: true, match: {paths: [/healthz]}}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "extauthz", "--config", str(policy), "--grpc-port", "0", "--admin-port", "-1"]
        assert main([*args, "--http-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"meshgate: cannot listen on 127.0.0.1 (ports grpc 0, http {port}, admin -1)" in err
    assert "Traceback" not in err


def test_apikey_new_prints_a_key_and_its_digest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apikey", "new"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0].split()[-1]
    assert out[1].split()[-1] == hash_api_key(key)


def test_apikey_hash_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("mgk_secret\n"))
    assert main(["apikey", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hash_api_key("mgk_secret")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["apikey", "hash"]) == 2


def test_serve_refuses_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "extauthz", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_ratelimit_answers_should_rate_limit_over_grpc(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text(
        "domain: shop\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 1}\n"
    )
    env = {**os.environ, "MESHGATE_RATELIMIT_HEADERS": "draft"}
    with ServiceProcess(["ratelimit", "--config", str(tmp_path), "--backend", "memory"], env=env) as svc:
        request = rls_pb2.RateLimitRequest(
            domain="shop",
            descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "user", "value": "a"}])],
        )
        with grpc.insecure_channel(f"127.0.0.1:{svc.ports['grpc_port']}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            first = stub.ShouldRateLimit(request, timeout=10)
            second = stub.ShouldRateLimit(request, timeout=10)
        assert first.overall_code == rls_pb2.RateLimitResponse.OK
        assert second.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
        assert "RateLimit" in {header.key for header in second.response_headers_to_add}
        status, _, body = get(svc.ports["admin_port"], "/readyz")
        assert status == 200
        assert b'"backend":true' in body


def test_serve_ratelimit_refuses_a_bad_backend(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text("domain: shop\n")
    command = [sys.executable, "-m", "meshgate", "serve", "ratelimit", "--config", str(tmp_path)]
    command += ["--backend", "postgres://db", "--grpc-port", "0", "--admin-port", "-1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "expected memory or a redis URL" in done.stderr


def test_serve_with_a_bad_policy_exits_1_with_file_and_line() -> None:
    bad = FIXTURES / "invalid" / "alg_none.yaml"
    command = [sys.executable, "-m", "meshgate", "serve", "extauthz", "--config", str(bad)]
    command += ["--grpc-port", "0", "--http-port", "-1", "--admin-port", "-1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert f"invalid config: {bad}:11:" in done.stderr


# -- healthcheck: /healthz on the admin port a running `meshgate serve` really uses --------------------------------

HEALTH_POLICY = "version: 1\nrules:\n  - {name: health, public: true, match: {paths: [/healthz]}}\n"  # nothing to fetch


def _fake_server(tmp_path: Path, *serve_args: str) -> subprocess.Popen[bytes]:
    """A process whose command line is `/.../meshgate serve extauthz ...` (as the console script runs) but which
    serves nothing."""
    script = tmp_path / "bin" / "meshgate"
    script.parent.mkdir(exist_ok=True)
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    script.chmod(0o755)
    policy = tmp_path / "policy.yaml"
    policy.write_text(HEALTH_POLICY)
    fake = subprocess.Popen([str(script), "serve", "extauthz", "--config", str(policy), *serve_args])
    cmdline = Path(f"/proc/{fake.pid}/cmdline")
    deadline = time.monotonic() + 10
    while b"\0serve\0" not in cmdline.read_bytes() and time.monotonic() < deadline:  # until the exec is done
        time.sleep(0.01)
    return fake


def test_healthcheck_follows_the_servers_flags_env_and_relative_settings_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its flag beats its settings file, which it named relative to its own folder; the check runs elsewhere."""
    from tests.support.ports import free_port
    from tests.support.procs import Proc

    folder = tmp_path / "srv"
    folder.mkdir()
    (folder / "policy.yaml").write_text(HEALTH_POLICY)
    from_file, from_flag = free_port(), free_port()
    (folder / "settings.yaml").write_text(
        f"config: policy.yaml\nhost: 127.0.0.1\ngrpc_port: 0\nhttp_port: -1\nadmin_port: {from_file}\n"
    )
    command = [sys.executable, "-m", "meshgate", "serve", "extauthz", "--settings", "settings.yaml"]
    with Proc([*command, "--admin-port", str(from_flag)], cwd=folder, name="serve") as server:
        server.wait_for_port(from_flag, timeout=30)
        assert main(["healthcheck", "--pid", str(server.pid)]) == 0
        assert capsys.readouterr().out.strip() == f"ok: 127.0.0.1:{from_flag}/healthz (process {server.pid})"
        # The policy gone while the server serves its last good one: still healthy (a review found it reported 1).
        (folder / "policy.yaml").unlink()
        assert main(["healthcheck", "--pid", str(server.pid)]) == 0


def test_healthcheck_finds_the_admin_port_by_its_sockets_when_the_settings_no_longer_tell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Settings edited or removed since the server started: its listening sockets name the admin port, and the
    ext_authz port (which answers this public /healthz with an empty 200) is not taken for it."""
    from tests.support.ports import free_port
    from tests.support.procs import Proc

    folder = tmp_path / "srv"
    folder.mkdir()
    (folder / "policy.yaml").write_text(HEALTH_POLICY)
    admin = free_port()
    settings = folder / "settings.yaml"
    settings.write_text(f"config: policy.yaml\nhost: 127.0.0.1\ngrpc_port: 0\nhttp_port: 0\nadmin_port: {admin}\n")
    command = [sys.executable, "-m", "meshgate", "serve", "extauthz", "--settings", "settings.yaml"]
    with Proc(command, cwd=folder, name="serve") as server:
        server.wait_for_port(admin, timeout=30)
        settings.write_text(settings.read_text().replace(f"admin_port: {admin}", f"admin_port: {free_port()}"))
        assert main(["healthcheck", "--pid", str(server.pid)]) == 0
        out = capsys.readouterr().out.strip()
        assert out.startswith(f"ok: 127.0.0.1:{admin}/healthz (process {server.pid}, found by its listening sockets")
        settings.unlink()
        assert main(["healthcheck", "--pid", str(server.pid)]) == 0
        assert capsys.readouterr().out.startswith(f"ok: 127.0.0.1:{admin}/healthz")


def test_healthcheck_finds_an_admin_port_picked_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.procs import Proc

    (tmp_path / "policy.yaml").write_text(HEALTH_POLICY)
    command = [sys.executable, "-m", "meshgate", "serve", "extauthz", "--config", str(tmp_path / "policy.yaml")]
    ports = ["--grpc-port", "0", "--http-port", "0", "--admin-port", "0"]
    with Proc([*command, *ports], cwd=tmp_path, name="serve") as server:
        deadline = time.monotonic() + 30
        cmdline = Path(f"/proc/{server.pid}/cmdline")
        while b"\0serve\0" not in cmdline.read_bytes() and time.monotonic() < deadline:  # until the exec is done
            time.sleep(0.01)
        out = ""
        while time.monotonic() < deadline and not out.startswith("ok:"):
            assert main(["healthcheck", "--pid", str(server.pid)]) == 0  # starting: "not found yet", still 0
            out = capsys.readouterr().out
            time.sleep(0.1)
        assert out.startswith("ok: 127.0.0.1:") and "port picked at start" in out


def test_healthcheck_fails_when_the_admin_port_does_not_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.ports import free_port

    port = free_port()  # nothing listens there
    fake = _fake_server(tmp_path, "--host", "0.0.0.0", "--admin-port", str(port))
    try:
        assert main(["healthcheck", "--pid", str(fake.pid)]) == 1
    finally:
        fake.kill()
        fake.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"meshgate healthcheck: 127.0.0.1:{port}/healthz: ")  # 0.0.0.0: loopback


def test_healthcheck_with_the_admin_port_off_only_sees_that_the_process_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = _fake_server(tmp_path, "--admin-port", "-1")
    try:
        assert main(["healthcheck", "--pid", str(fake.pid)]) == 0
        assert "admin port is off, /healthz not checked" in capsys.readouterr().out
        assert main(["status", "--pid", str(fake.pid)]) == 1  # but the /v1 calls have nowhere to go
        assert "its admin port is off" in capsys.readouterr().err
    finally:
        fake.kill()
        fake.wait()


def test_healthcheck_refuses_other_processes_and_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["healthcheck", "--pid", str(os.getpid())]) == 1  # pytest is no `meshgate serve`
    assert f"no `meshgate serve` process {os.getpid()}" in capsys.readouterr().err
    fake = _fake_server(tmp_path, "--admin-port", "70000")
    try:
        assert main(["healthcheck", "--pid", str(fake.pid)]) == 1
    finally:
        fake.kill()
        fake.wait()
    assert "70000 is not a port" in capsys.readouterr().err


def test_status_reload_and_check_reach_the_running_servers_v1_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """From inside the container (kubectl exec: loopback, no curl in the image), through the admin port."""
    from tests.support.ports import free_port
    from tests.support.procs import Proc

    policy = tmp_path / "policy.yaml"
    policy.write_text(HEALTH_POLICY)
    admin = free_port()
    command = [sys.executable, "-m", "meshgate", "serve", "extauthz", "--config", str(policy), "--grpc-port", "0"]
    with Proc([*command, "--http-port", "-1", "--admin-port", str(admin)], cwd=tmp_path, name="serve") as server:
        server.wait_for_port(admin, timeout=30)
        pid = ["--pid", str(server.pid)]
        assert main(["status", *pid]) == 0
        assert json.loads(capsys.readouterr().out)["config"]["generation"] == 1

        policy.write_text("version: 1\nrules: [oops\n")
        assert main(["reload", *pid]) == 1  # rejected: exit 1, the file:line error printed, the old one serves
        rejected = json.loads(capsys.readouterr().out)
        assert rejected["error"]["code"] == "invalid_config" and f"{policy}:" in rejected["error"]["message"]
        assert rejected["config"]["generation"] == 1

        policy.write_text(HEALTH_POLICY + "  - {name: open, public: true, match: {paths: [/open]}}\n")
        assert main(["reload", *pid]) == 0
        assert json.loads(capsys.readouterr().out)["config"]["generation"] == 2

        assert main(["check", "/open", "--method", "post", *pid]) == 0
        allowed = json.loads(capsys.readouterr().out)
        assert (allowed["allowed"], allowed["rule"]) == (True, "open")
        assert main(["check", "/private", "-H", "authorization: Bearer not-a-jwt", *pid]) == 0  # answered: exit 0
        denied = json.loads(capsys.readouterr().out)
        assert (denied["allowed"], denied["status"]) == (False, 401)
        assert "not-a-jwt" not in json.dumps(denied)
        assert main(["check", "/x", "-H", "no colon", *pid]) == 2
        assert "expected 'name: value'" in capsys.readouterr().err


def _decisions(admin: int) -> float:
    """meshgate_extauthz_decisions_total summed over its series, from the server's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("meshgate_extauthz_decisions_total")
    )


def test_healthcheck_takes_no_other_port_for_the_admin_and_makes_no_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Settings edited to name the ext_authz port as the admin's: its empty 200 is not the admin's answer, so the
    sockets are searched, without probing the known service ports (a probe there would be an authz decision)."""
    from tests.support.ports import free_port
    from tests.support.procs import Proc

    folder = tmp_path / "srv"
    folder.mkdir()
    (folder / "policy.yaml").write_text(HEALTH_POLICY)
    admin, http_port = free_port(), free_port()
    settings = folder / "settings.yaml"
    body = f"config: policy.yaml\nhost: 127.0.0.1\ngrpc_port: 0\nhttp_port: {http_port}\nadmin_port: {{}}\n"
    settings.write_text(body.format(admin))
    command = [sys.executable, "-m", "meshgate", "serve", "extauthz", "--settings", "settings.yaml"]
    with Proc(command, cwd=folder, name="serve") as server:
        server.wait_for_port(admin, timeout=30)
        server.wait_for_port(http_port, timeout=30)
        settings.write_text(body.format(http_port))  # the admin port "moved" onto the ext_authz port
        assert main(["healthcheck", "--pid", str(server.pid)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"ok: 127.0.0.1:{admin}/healthz") and "not as the admin port does" in out
        settings.write_text(body.format(free_port()))  # a port nothing listens on; http_port still known
        before = _decisions(admin)
        assert main(["healthcheck", "--pid", str(server.pid)]) == 0
        assert capsys.readouterr().out.startswith(f"ok: 127.0.0.1:{admin}/healthz")
        assert _decisions(admin) == before  # the ext_authz port was not probed
