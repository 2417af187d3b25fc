"""The ``meshgate`` command: serve, validate, demo, apikey, healthcheck."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshgate import __version__
from meshgate.procnet import listening_ports
from meshgate.settings import (
    LOG_LEVELS,
    RATELIMIT_HEADER_MODES,
    SERVICES,
    SETTINGS_FILE_ENV,
    ServeSettings,
    SettingsError,
    env_name,
    load_settings,
)
from meshgate.yamlconf import ConfigError


def _serve_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``serve``'s flags by setting name (None: not given), for ``load_settings``."""
    return {
        "service": args.service,
        "settings": args.settings,
        "config": args.config,
        "host": args.host,
        "grpc_port": args.grpc_port,
        "http_port": args.http_port,
        "admin_port": args.admin_port,
        "admin_allow_remote": args.admin_allow_remote,
        "log_level": args.log_level,
        "drain_s": args.drain_seconds,
        "shutdown_delay_s": args.shutdown_delay_seconds,
        "deadline_s": args.deadline_seconds,
        "backend": args.backend,
        "backend_timeout_s": args.backend_timeout_seconds,
        "shadow_mode": True if args.shadow_mode else None,
        "ratelimit_headers": args.ratelimit_headers,
        "batch_helper_threads": args.batch_helper_threads,
    }


def _serve(args: argparse.Namespace) -> int:
    from meshgate.log import configure_logging
    from meshgate.runtime import run_forever

    try:
        settings = load_settings(_serve_flags(args))
    except SettingsError as error:
        print(f"meshgate: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.service == "extauthz":
        from extauthz.app import build_extauthz as build
    else:
        from ratelimit.app import build_ratelimit as build
    try:
        run_forever(settings, build)
    except ConfigError as error:
        print(f"meshgate: invalid config: {error}", file=sys.stderr)
        return 1
    except SettingsError as error:  # raised while building (e.g. a malformed --backend URL)
        print(f"meshgate: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a port in use, an address this host does not have: one line, not a traceback
        print(f"meshgate: cannot listen on {settings.host} (ports {_ports(settings)}): {error}", file=sys.stderr)
        return 2
    return 0


def _ports(settings: ServeSettings) -> str:
    return f"grpc {settings.grpc_port}, http {settings.http_port}, admin {settings.admin_port}"


def _validate(args: argparse.Namespace) -> int:
    from meshgate.validate import validate_path

    failed = False
    for path in args.paths:
        try:
            summary = validate_path(Path(path))
        except ConfigError as error:
            print(f"{error}", file=sys.stderr)
            failed = True
        else:
            print(f"{path}: ok ({summary})")
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    from meshgate.demo import run_demo

    return run_demo(tour_only=args.tour_only)


def _serving_process(pid: int | None) -> int | None:
    """``pid``; else PID 1 when it is ``meshgate serve`` (a container's), else the lowest-numbered one running."""
    if pid is not None:
        return pid
    candidates = [1, *sorted(int(entry.name) for entry in Path("/proc").glob("[0-9]*") if entry.name != "1")]
    own = os.getpid()
    return next((found for found in candidates if found != own and _serve_argv(found) is not None), None)


def _serve_argv(pid: int) -> list[str] | None:
    """What follows ``serve`` in the command line of process ``pid`` when it runs ``meshgate serve``, else None."""
    try:
        argv = [part.decode(errors="replace") for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    except OSError:
        return None
    for index, part in enumerate(argv):
        if (
            part == "serve"
            and index
            and (Path(argv[index - 1]).name == "meshgate" or argv[max(0, index - 2) : index] == ["-m", "meshgate"])
        ):
            return argv[index + 1 :]
    return None


def _process_environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` started with; this process's own when it cannot be read (Docker gives a
    HEALTHCHECK the container's environment, so the same)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def _effective_settings(pid: int, argv: Sequence[str]) -> ServeSettings:
    """The settings that ``meshgate serve`` process ``pid`` (``argv`` after ``serve``) resolved at start: its
    flags, its environment, its settings file."""
    complaint = io.StringIO()
    with contextlib.redirect_stderr(complaint):
        try:
            args = build_parser().parse_args(["serve", *argv])
        except SystemExit:
            why = complaint.getvalue().strip().splitlines()[-1:] or ["?"]
            raise SettingsError(f"cannot read its command line: {why[0]}") from None
    flags = _serve_flags(args)
    environ = _process_environ(pid)
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        cwd = Path.cwd()
    # Relative paths were relative to that process's folder, not to ours.
    for name in ("settings", "config"):
        if flags.get(name):
            flags[name] = str(cwd / flags[name])
    for variable in (SETTINGS_FILE_ENV, env_name("config")):
        if environ.get(variable):
            environ[variable] = str(cwd / environ[variable])
    return load_settings(flags, environ, config_must_exist=False)  # it serves its last good config meanwhile


def _loopback_for(host: str) -> str:
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _probe_healthz(host: str, port: int, timeout: float) -> tuple[int, bytes]:
    """(status, body) of ``GET /healthz``; raises OSError or HTTPException when nothing answers it."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/healthz", headers={"Connection": "close"})
        answer = connection.getresponse()
        return answer.status, answer.read(256)
    finally:
        connection.close()


def _is_admin_healthz(status: int, body: bytes) -> bool:
    """The admin's own answer: the ext_authz port answers a public /healthz with an empty 200 or a JSON denial."""
    try:
        return status == 200 and json.loads(body) == {"status": "ok"}
    except ValueError:
        return False


def _admin_among_listeners(
    pid: int, skip: Sequence[tuple[str, int]], deadline: float, not_ports: Sequence[int] = ()
) -> tuple[str, int] | None:
    """The socket of ``pid`` that answers ``/healthz`` as the admin port does, trying the highest ports first (the
    defaults: admin 9090 above ext_authz 9002 and gRPC 9001, so no probe becomes an authorization decision) and
    never ``not_ports`` (its known service ports); all probes together within ``deadline`` (a monotonic time)."""
    for address, port in sorted(listening_ports(pid), key=lambda item: -item[1]):
        host = _loopback_for(address)
        remaining = deadline - time.monotonic()
        if (host, port) in skip or port in not_ports:
            continue
        if remaining <= 0:
            return None
        with contextlib.suppress(OSError, http.client.HTTPException):
            if _is_admin_healthz(*_probe_healthz(host, port, remaining)):
                return host, port
    return None


@dataclass(frozen=True)
class _AdminPort:
    """Where a serving process's admin port answers ``/healthz`` as the admin does."""

    host: str
    port: int
    how: str = ""  # how it was found when not from the settings


@dataclass(frozen=True)
class _NoAdminPort:
    why: str
    expected: bool = False  # off, or picked at start and not up yet: nothing is wrong with the process


def _find_admin(pid: int, argv: Sequence[str], timeout: float) -> _AdminPort | _NoAdminPort:
    """The admin port process ``pid`` (``meshgate serve`` + ``argv``) really uses: from its flags, environment and
    settings file, when the port they name answers as the admin does; else (the file edited or removed since it
    started, or a port picked at start) from its listening sockets. Within ``timeout`` in all."""
    deadline = time.monotonic() + timeout
    try:
        settings = _effective_settings(pid, argv)
    except SettingsError as error:
        return _by_listeners(pid, (), deadline, f"settings of process {pid}: {error}")
    if settings.admin_port < 0:
        return _NoAdminPort(f"process {pid} runs; its admin port is off", expected=True)
    services = [port for port in (settings.grpc_port, settings.http_port) if port > 0]
    if settings.admin_port == 0:  # a free port picked at start (logged)
        found = _admin_among_listeners(pid, (), deadline, services)
        if found is None:
            why = f"process {pid} runs; its admin port was picked at start and is not found yet"
            return _NoAdminPort(why, expected=True)
        return _AdminPort(*found, "port picked at start")
    host = _loopback_for(settings.host)
    where = f"{host}:{settings.admin_port}/healthz"
    try:
        status, body = _probe_healthz(host, settings.admin_port, timeout)
    except (OSError, http.client.HTTPException) as error:
        problem = f"{where}: {error}"
    else:
        if _is_admin_healthz(status, body):
            return _AdminPort(host, settings.admin_port)
        problem = f"{where} answered {status}" + ("" if status != 200 else ", not as the admin port does")
    # Perhaps its settings changed since it started: is another of its sockets the admin port?
    return _by_listeners(pid, [(host, settings.admin_port)], deadline, problem, services)


def _by_listeners(
    pid: int, tried: Sequence[tuple[str, int]], deadline: float, problem: str, not_ports: Sequence[int] = ()
) -> _AdminPort | _NoAdminPort:
    found = _admin_among_listeners(pid, tried, deadline, not_ports)
    if found is None:
        return _NoAdminPort(problem)
    return _AdminPort(*found, f"found by its listening sockets; {problem}")


def _serving(command: str, pid_arg: int | None) -> tuple[int, list[str]] | None:
    pid = _serving_process(pid_arg)
    argv = None if pid is None else _serve_argv(pid)
    if pid is None or argv is None:
        print(f"meshgate {command}: no `meshgate serve` process{'' if pid is None else f' {pid}'}", file=sys.stderr)
        return None
    return pid, argv


def _healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when ``/healthz`` answers 200 on the admin port that ``meshgate serve`` really uses, else 1."""
    serving = _serving("healthcheck", args.pid)
    if serving is None:
        return 1
    pid, argv = serving
    admin = _find_admin(pid, argv, args.timeout)
    if isinstance(admin, _NoAdminPort):
        if admin.expected:
            print(f"{admin.why}, /healthz not checked")
            return 0
        print(f"meshgate healthcheck: {admin.why}", file=sys.stderr)
        return 1
    print(f"ok: {admin.host}:{admin.port}/healthz (process {pid}{f', {admin.how}' if admin.how else ''})")
    return 0


def _admin_call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> int:
    """One call to the serving process's ``/v1`` API on its admin port, from inside its container (``kubectl
    exec``: loopback, which the API's local calls require; the image has no curl). Prints the JSON answer; exit 0
    on a 2xx answer, else 1."""
    serving = _serving(args.command, args.pid)
    if serving is None:
        return 1
    pid, argv = serving
    admin = _find_admin(pid, argv, min(args.timeout, 5.0))
    if isinstance(admin, _NoAdminPort):
        print(f"meshgate {args.command}: {admin.why}", file=sys.stderr)
        return 1
    payload = None if body is None else json.dumps(body).encode()
    connection = http.client.HTTPConnection(admin.host, admin.port, timeout=args.timeout)
    try:
        headers = {"Connection": "close", "Content-Type": "application/json"}
        connection.request(method, path, body=payload, headers=headers)
        answer = connection.getresponse()
        status, raw = answer.status, answer.read()
    except (OSError, http.client.HTTPException) as error:
        print(f"meshgate {args.command}: {admin.host}:{admin.port}{path}: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    try:
        print(json.dumps(json.loads(raw), indent=2))
    except ValueError:
        print(raw.decode("utf-8", "replace"))
    return 0 if 200 <= status < 300 else 1


def _status(args: argparse.Namespace) -> int:
    return _admin_call(args, "GET", "/v1/status")


def _reload(args: argparse.Namespace) -> int:
    return _admin_call(args, "POST", "/v1/reload")


def _check(args: argparse.Namespace) -> int:
    headers: dict[str, list[str]] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            print(f"meshgate check: --header {item!r}: expected 'name: value'", file=sys.stderr)
            return 2
        headers.setdefault(name.strip(), []).append(value.strip())
    body = {"method": args.method, "host": args.host, "path": args.path, "headers": headers}
    return _admin_call(args, "POST", "/v1/check", body)


def _apikey(args: argparse.Namespace) -> int:
    from extauthz.identity.apikey import generate_api_key, hash_api_key

    if args.action == "new":
        key = generate_api_key()
        print(f"key:    {key}\nsha256: {hash_api_key(key)}")
        print("Give the key to the client; put only the sha256 in the keys file.", file=sys.stderr)
    else:
        key = sys.stdin.readline().strip()
        if not key:
            print("meshgate: no key on standard input", file=sys.stderr)
            return 2
        print(hash_api_key(key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshgate", description="External authorization and global rate limiting for Envoy and Istio."
    )
    parser.add_argument("--version", action="version", version=f"meshgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve one of the services")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--config", help="policy file (extauthz) or descriptor directory (ratelimit)")
    serve.add_argument(
        "--settings", help="YAML file of settings (keys: the MESHGATE_* names, lower-case); flags and env win"
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (0 picks a free one; default 9001)")
    serve.add_argument("--http-port", type=int, help="extauthz HTTP ext_authz port (-1 off; default 9002)")
    serve.add_argument("--admin-port", type=int, help="admin HTTP port (-1 off; default 9090)")
    serve.add_argument(
        "--admin-allow-remote",
        action=argparse.BooleanOptionalAction,
        help="answer the admin API's /v1 calls that reveal or change things (all but /v1/status) to non-loopback "
        "clients too (default off: kubectl port-forward and exec arrive on loopback)",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS)
    serve.add_argument("--drain-seconds", type=float, help="SIGTERM grace for in-flight calls (default 5)")
    serve.add_argument(
        "--shutdown-delay-seconds", type=float, help="after SIGTERM, not ready but still serving this long (default 0)"
    )
    serve.add_argument("--deadline-seconds", type=float, help="per-call budget, under Envoy's timeout (default 0.8)")
    serve.add_argument(
        "--backend",
        help="ratelimit counters: memory (default) or a redis://, rediss://, redis+cluster://, redis+sentinel:// or "
        "unix:// (socket path) URL",
    )
    serve.add_argument("--backend-timeout-seconds", type=float, help="ratelimit: per Redis call (default 0.1)")
    serve.add_argument(
        "--shadow-mode", action="store_true", help="ratelimit: never refuse; count and log what would be refused"
    )
    serve.add_argument(
        "--ratelimit-headers", choices=RATELIMIT_HEADER_MODES, help="ratelimit: response headers (default off)"
    )
    serve.add_argument(
        "--batch-helper-threads",
        action=argparse.BooleanOptionalAction,
        help="run grpc's helper threads as SCHED_BATCH so they do not preempt the event loop (default on)",
    )
    serve.set_defaults(handler=_serve)

    validate = commands.add_parser("validate", help="check config files; exit 1 with file:line on an error")
    validate.add_argument("paths", nargs="+")
    validate.set_defaults(handler=_validate)

    demo = commands.add_parser("demo", help="run Envoy + meshgate on loopback and take a short tour")
    demo.add_argument("--tour-only", action="store_true", help="run the tour and exit (non-zero on a failure)")
    demo.set_defaults(handler=_demo)

    apikey = commands.add_parser("apikey", help="make API keys for the keys file")
    apikey.add_argument("action", choices=("new", "hash"), help="new: a fresh key and its hash; hash: of stdin")
    apikey.set_defaults(handler=_apikey)

    healthcheck = commands.add_parser(
        "healthcheck",
        help="exit 0 when /healthz answers on the admin port a running `meshgate serve` uses (its flags, env and "
        "settings file), else 1: for a container's HEALTHCHECK",
    )
    pid_help = "the serving process (default: PID 1 if it is `meshgate serve`, else the first one)"
    healthcheck.add_argument("--pid", type=int, help=pid_help)
    healthcheck.add_argument("--timeout", type=float, default=1.0, help="seconds for /healthz to answer (default 1)")
    healthcheck.set_defaults(handler=_healthcheck)

    for name, handler, text in (
        ("status", _status, "print the running server's /v1/status (version, readiness, the config served)"),
        ("reload", _reload, "make the running server check its config files now (/v1/reload); exit 1 if rejected"),
        ("check", _check, "dry run (extauthz /v1/check): what the running server would decide for a request"),
    ):
        command = commands.add_parser(name, help=f"{text}; from inside its container (kubectl exec)")
        command.add_argument("--pid", type=int, help=pid_help)
        command.add_argument("--timeout", type=float, default=30.0, help="seconds for the answer (default 30)")
        command.set_defaults(handler=handler)
        if name == "check":
            command.add_argument("path", help="the request's path, with its ?query")
            command.add_argument("--method", default="GET")
            command.add_argument("--host", default="", help="the :authority")
            command.add_argument(
                "-H", "--header", action="append", default=[], help="'name: value', repeatable (a token, a key)"
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
