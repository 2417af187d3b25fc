"""The `meshgate` command's own paths (serve itself is exercised end to end in tests/e2e)."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from extauthz.identity.apikey import hash_api_key
from meshgate.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "policies"


def test_validate_good_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(FIXTURES / "example.yaml")]) == 0
    assert "ok (extauthz policy; identity providers: jwt, api_key, spiffe)" in capsys.readouterr().out


def test_validate_bad_policy_names_file_and_line(capsys: pytest.CaptureFixture[str]) -> None:
    bad = FIXTURES / "invalid" / "alg_none.yaml"
    assert main(["validate", str(FIXTURES / "example.yaml"), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:11: algorithms: 'none' is never accepted" in err


def test_validate_rejects_ratelimit_configs_until_supported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    descriptors = tmp_path / "config.yaml"
    descriptors.write_text("domain: shop\ndescriptors: []\n")
    assert main(["validate", str(descriptors), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ratelimit descriptor files are not supported yet" in err
    assert "ratelimit descriptor directories are not supported yet" in err


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


def test_serve_ratelimit_is_not_built_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "ratelimit", "--config", str(tmp_path)]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_serve_with_a_bad_policy_exits_1_with_file_and_line() -> None:
    bad = FIXTURES / "invalid" / "alg_none.yaml"
    command = [sys.executable, "-m", "meshgate", "serve", "extauthz", "--config", str(bad)]
    command += ["--grpc-port", "0", "--http-port", "-1", "--admin-port", "-1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert f"invalid config: {bad}:11:" in done.stderr
