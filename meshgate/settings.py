"""Process settings: loaded once from flags, then ``MESHGATE_*`` environment variables, then a settings file
(``--settings`` / ``MESHGATE_SETTINGS``), then defaults.

Validated at start-up; a bad value stops the process with one clear line naming the flag and its env variable (or
the file and line). The file is YAML whose keys are the env names without ``MESHGATE_``, lower-case
(``grpc_port: 9001``, ``deadline_s: 0.4``); a relative ``config`` is taken from the file's folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from meshgate import yamlconf

SERVICES = ("extauthz", "ratelimit")
LOG_LEVELS = ("debug", "info", "warning", "error")
RATELIMIT_HEADER_MODES = ("off", "draft", "classic", "both")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class SettingsError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ServeSettings:
    service: str
    config: Path
    host: str = "127.0.0.1"
    grpc_port: int = 9001  # 0 picks a free port (logged)
    http_port: int = 9002  # extauthz's HTTP ext_authz mode; -1 turns it off
    admin_port: int = 9090  # -1 turns it off
    # the admin API's calls that reveal or change things (/v1 but /v1/status) answer non-loopback clients too
    admin_allow_remote: bool = False
    log_level: str = "info"
    drain_s: float = 5.0  # after SIGTERM: not-ready first, then at most this long for in-flight calls
    # after SIGTERM, before the drain: not ready but still serving, while load balancers (Kubernetes endpoints,
    # Envoy's health checks) stop sending; 0 drains at once
    shutdown_delay_s: float = 0.0
    # per-call budget before failing closed: under ext_authz's timeout (1 s in envoy/*.yaml); for ratelimit only a
    # guard against a stuck call (its Redis deadline is backend_timeout_s, under the filter's 0.25 s)
    deadline_s: float = 0.8
    reload_interval_s: float = 1.0  # how often config files are checked for changes
    backend: str = "memory"  # ratelimit counters: memory | redis:// | rediss:// | redis+cluster:// | redis+sentinel://
    backend_timeout_s: float = 0.1  # ratelimit: per backend call; past it the store counts as unavailable
    shadow_mode: bool = False  # ratelimit: never refuse, only count and log what would have been refused
    ratelimit_headers: str = "off"  # ratelimit: off | draft (IETF RateLimit) | classic (X-RateLimit-*) | both
    near_limit_ratio: float = 0.8  # ratelimit: share of a limit from which hits count as near_limit
    batch_helper_threads: bool = True  # threads but the loop's (grpc's) as SCHED_BATCH: fewer preemptions

    @property
    def env_names(self) -> dict[str, str]:
        return {f.name: env_name(f.name) for f in fields(self)}


def env_name(field_name: str) -> str:
    return f"MESHGATE_{field_name.upper()}"


def _coerce(name: str, raw: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text not in _TRUE | _FALSE:
                raise ValueError(text)
            return text in _TRUE
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise SettingsError(
            f"--{name.replace('_', '-')} / {env_name(name)}: expected {kind.__name__}, got {raw!r}"
        ) from None


_KINDS: dict[str, type] = {
    "service": str,
    "config": Path,
    "host": str,
    "grpc_port": int,
    "http_port": int,
    "admin_port": int,
    "admin_allow_remote": bool,
    "log_level": str,
    "drain_s": float,
    "shutdown_delay_s": float,
    "deadline_s": float,
    "reload_interval_s": float,
    "backend": str,
    "backend_timeout_s": float,
    "shadow_mode": bool,
    "ratelimit_headers": str,
    "near_limit_ratio": float,
    "batch_helper_threads": bool,
}


SETTINGS_FILE_ENV = "MESHGATE_SETTINGS"


def load_settings(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None, *, config_must_exist: bool = True
) -> ServeSettings:
    """Flags (None = not given) win over ``MESHGATE_*`` env variables, which win over the settings file (flag
    ``settings`` or ``MESHGATE_SETTINGS``), which wins over defaults. ``config_must_exist=False`` is for
    reading a running server's settings: its config may be gone while it serves the last good one."""
    environ = os.environ if environ is None else environ
    settings_file = flags.get("settings") or environ.get(SETTINGS_FILE_ENV)
    from_file = _file_values(Path(settings_file)) if settings_file else {}
    values = {name: value for name, (value, _) in from_file.items()}
    for name, kind in _KINDS.items():
        raw = flags.get(name)
        if raw is None:
            raw = environ.get(env_name(name))
        if raw is not None:
            values[name] = _coerce(name, raw, kind)
            from_file.pop(name, None)
    if "service" not in values:
        raise SettingsError("a service is required: extauthz or ratelimit")
    if "config" not in values:
        raise SettingsError(f"--config / {env_name('config')} is required")
    settings = ServeSettings(**values)
    validate(settings, {name: where for name, (_, where) in from_file.items()}, config_must_exist=config_must_exist)
    return settings


def _file_values(path: Path) -> dict[str, tuple[Any, str]]:
    """The settings file's values by field name, coerced, each with where it stands ("settings file F:LINE");
    errors name the file and line."""
    try:
        data = yamlconf.load(path)
        if data is None:
            return {}
        reader = yamlconf.Reader(data, str(path), what="mapping of settings")
    except yamlconf.ConfigError as error:
        raise SettingsError(f"settings file {error}") from None
    values: dict[str, tuple[Any, str]] = {}
    for name, raw in data.items():
        where = f"settings file {path}:{reader.line_of(name)}"
        kind = _KINDS.get(name)
        if kind is None:
            raise SettingsError(f"{where}: unknown setting {name!r} (known: {', '.join(_KINDS)})")
        wrong_type = (
            raw is None
            or isinstance(raw, dict | list)
            or (isinstance(raw, bool) and kind not in (bool, str))  # grpc_port: true is no port 1
            or (kind is int and isinstance(raw, float))  # nor is 9001.9 port 9001
        )
        if wrong_type:
            raise SettingsError(f"{where}: {name}: expected {kind.__name__}, got {raw!r}")
        if kind is str and isinstance(raw, bool):
            raw = "on" if raw else "off"  # YAML 1.1 reads a bare off/on as a bool: ratelimit_headers: off
        try:
            value = _coerce(name, raw, kind)
        except SettingsError as error:
            raise SettingsError(f"{where}: {error}") from None
        if name == "config" and not value.is_absolute():
            value = path.parent / value
        values[name] = (value, where)
    return values


_POSITIVE = ("drain_s", "deadline_s", "reload_interval_s", "backend_timeout_s")


def _problem(name: str, value: Any) -> str | None:
    """What is wrong with one setting's value (None: nothing), naming its flag and environment variable."""
    flag = f"--{name.replace('_', '-')} / {env_name(name)}"
    if name == "service" and value not in SERVICES:
        return f"unknown service {value!r}; expected one of {', '.join(SERVICES)}"
    if name in ("grpc_port", "http_port", "admin_port") and not (0 if name == "grpc_port" else -1) <= value <= 65535:
        return f"{flag}: {value} is not a port"
    if name == "log_level" and value not in LOG_LEVELS:
        return f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {value!r}"
    if name in _POSITIVE and not value > 0:
        return f"{env_name(name)}: must be positive"
    if name == "shutdown_delay_s" and not value >= 0:
        return f"--shutdown-delay-seconds / {env_name(name)}: must be 0 or more"
    if name == "ratelimit_headers" and value not in RATELIMIT_HEADER_MODES:
        return f"{flag}: expected one of {', '.join(RATELIMIT_HEADER_MODES)}, got {value!r}"
    if name == "near_limit_ratio" and not 0 < value <= 1:
        return f"{env_name(name)}: must be in (0, 1]"
    if name == "config" and not value.exists():
        return f"--config: {value} does not exist"
    return None


def validate(
    settings: ServeSettings, file_lines: Mapping[str, str] | None = None, *, config_must_exist: bool = True
) -> None:
    """SettingsError for the first bad value; one taken from the settings file is named by its file and line."""
    for field in fields(settings):
        if field.name == "config" and not config_must_exist:
            continue
        problem = _problem(field.name, getattr(settings, field.name))
        if problem is not None:
            where = (file_lines or {}).get(field.name)
            raise SettingsError(f"{where}: {problem}" if where else problem)
