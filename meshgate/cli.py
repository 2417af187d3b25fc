"""The ``meshgate`` command: serve, validate, demo, apikey, healthcheck."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import sys
from collections.abc import Sequence
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


def _admin_among_listeners(pid: int, skip: tuple[str, int] | None, timeout: float) -> tuple[str, int] | None:
    """The socket of ``pid`` that answers ``/healthz`` as the admin port does (200, ``{"status":"ok"}``): the
    other ports are gRPC (no HTTP/1.1) and ext_authz (an empty 200 or a JSON denial), never that body."""
    for address, port in listening_ports(pid):
        host = _loopback_for(address)
        if (host, port) == skip:
            continue
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            status, body = _probe_healthz(host, port, timeout)
            if status == 200 and json.loads(body) == {"status": "ok"}:
                return host, port
    return None


def _healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when ``/healthz`` answers 200 on the admin port that ``meshgate serve`` really uses, else 1.

    That port comes from the process's flags, environment and settings file. When they no longer tell (the file
    was edited or removed since it started, or the port was picked at start), the process's listening sockets do.
    """
    pid = _serving_process(args.pid)
    argv = None if pid is None else _serve_argv(pid)
    if pid is None or argv is None:
        print(f"meshgate healthcheck: no `meshgate serve` process{'' if pid is None else f' {pid}'}", file=sys.stderr)
        return 1
    try:
        settings = _effective_settings(pid, argv)
    except SettingsError as error:
        problem = f"settings of process {pid}: {error}"
        return _healthcheck_by_listeners(pid, None, problem, args.timeout)
    if settings.admin_port < 0:
        print(f"process {pid} runs; its admin port is off, /healthz not checked")
        return 0
    if settings.admin_port == 0:  # a free port picked at start (logged)
        found = _admin_among_listeners(pid, None, args.timeout)
        if found is None:
            print(f"process {pid} runs; its admin port was picked at start and is not found yet, /healthz not checked")
            return 0
        print(f"ok: {found[0]}:{found[1]}/healthz (process {pid}, port picked at start)")
        return 0
    host = _loopback_for(settings.host)
    where = f"{host}:{settings.admin_port}"
    try:
        status, _body = _probe_healthz(host, settings.admin_port, args.timeout)
    except (OSError, http.client.HTTPException) as error:
        # Perhaps its settings changed since it started: is another of its sockets the admin port?
        return _healthcheck_by_listeners(pid, (host, settings.admin_port), f"{where}/healthz: {error}", args.timeout)
    if status != 200:
        print(f"meshgate healthcheck: {where}/healthz answered {status}", file=sys.stderr)
        return 1
    print(f"ok: {where}/healthz (process {pid})")
    return 0


def _healthcheck_by_listeners(pid: int, tried: tuple[str, int] | None, problem: str, timeout: float) -> int:
    found = _admin_among_listeners(pid, tried, timeout)
    if found is None:
        print(f"meshgate healthcheck: {problem}", file=sys.stderr)
        return 1
    print(f"ok: {found[0]}:{found[1]}/healthz (process {pid}, found by its listening sockets; {problem})")
    return 0


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
    healthcheck.add_argument(
        "--pid", type=int, help="the serving process (default: PID 1 if it is `meshgate serve`, else the first one)"
    )
    healthcheck.add_argument("--timeout", type=float, default=1.0, help="seconds for /healthz to answer (default 1)")
    healthcheck.set_defaults(handler=_healthcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
