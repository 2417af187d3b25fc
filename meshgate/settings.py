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
    log_level: str = "info"
    drain_s: float = 5.0  # after SIGTERM: not-ready first, then at most this long for in-flight calls
    deadline_s: float = 0.8  # per-call budget before failing closed; under Envoy's timeout (1 s in envoy/*.yaml)
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
    "log_level": str,
    "drain_s": float,
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


def load_settings(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Flags (None = not given) win over ``MESHGATE_*`` env variables, which win over the settings file (flag
    ``settings`` or ``MESHGATE_SETTINGS``), which wins over defaults."""
    environ = os.environ if environ is None else environ
    settings_file = flags.get("settings") or environ.get(SETTINGS_FILE_ENV)
    values = _file_values(Path(settings_file)) if settings_file else {}
    for name, kind in _KINDS.items():
        raw = flags.get(name)
        if raw is None:
            raw = environ.get(env_name(name))
        if raw is not None:
            values[name] = _coerce(name, raw, kind)
    if "service" not in values:
        raise SettingsError("a service is required: extauthz or ratelimit")
    if "config" not in values:
        raise SettingsError(f"--config / {env_name('config')} is required")
    settings = ServeSettings(**values)
    validate(settings)
    return settings


def _file_values(path: Path) -> dict[str, Any]:
    """The settings file's values by field name, coerced; errors name the file and line."""
    try:
        data = yamlconf.load(path)
        if data is None:
            return {}
        reader = yamlconf.Reader(data, str(path), what="mapping of settings")
    except yamlconf.ConfigError as error:
        raise SettingsError(f"settings file {error}") from None
    values: dict[str, Any] = {}
    for name, raw in data.items():
        where = f"settings file {path}:{reader.line_of(name)}"
        kind = _KINDS.get(name)
        if kind is None:
            raise SettingsError(f"{where}: unknown setting {name!r} (known: {', '.join(_KINDS)})")
        if isinstance(raw, dict | list) or raw is None:
            raise SettingsError(f"{where}: {name}: expected {kind.__name__}, got {raw!r}")
        try:
            values[name] = _coerce(name, raw, kind)
        except SettingsError as error:
            raise SettingsError(f"{where}: {error}") from None
    if "config" in values and not values["config"].is_absolute():
        values["config"] = path.parent / values["config"]
    return values


def validate(settings: ServeSettings) -> None:
    if settings.service not in SERVICES:
        raise SettingsError(f"unknown service {settings.service!r}; expected one of {', '.join(SERVICES)}")
    for name in ("grpc_port", "http_port", "admin_port"):
        port = getattr(settings, name)
        lowest = 0 if name == "grpc_port" else -1
        if not lowest <= port <= 65535:
            raise SettingsError(f"--{name.replace('_', '-')} / {env_name(name)}: {port} is not a port")
    if settings.log_level not in LOG_LEVELS:
        raise SettingsError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {settings.log_level!r}")
    for name in ("drain_s", "deadline_s", "reload_interval_s", "backend_timeout_s"):
        if getattr(settings, name) <= 0:
            raise SettingsError(f"{env_name(name)}: must be positive")
    if settings.ratelimit_headers not in RATELIMIT_HEADER_MODES:
        raise SettingsError(
            f"--ratelimit-headers / {env_name('ratelimit_headers')}: expected one of "
            f"{', '.join(RATELIMIT_HEADER_MODES)}, got {settings.ratelimit_headers!r}"
        )
    if not 0 < settings.near_limit_ratio <= 1:
        raise SettingsError(f"{env_name('near_limit_ratio')}: must be in (0, 1]")
    if not settings.config.exists():
        raise SettingsError(f"--config: {settings.config} does not exist")
