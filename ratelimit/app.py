"""Composition root of the rate-limit service: config dir -> watched config, backend -> RateLimitService, served.

A reload loads and validates the whole directory, then swaps the new config in atomically (the last good one keeps
serving on a failure). Counters never live in the config: they stay in the backend under keys built from the
domain, the entries and the limit (``keys.counter_key``), so a reload never resets the counters of unchanged rules.

Its options come from the process settings (flags or ``MESHGATE_*`` variables): ``--backend``,
``--backend-timeout-seconds``, ``--shadow-mode``, ``--ratelimit-headers`` (off | draft | classic | both) and
``MESHGATE_NEAR_LIMIT_RATIO``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshgate.admin_api import v1_router
from meshgate.redis import URL_SCHEMES
from meshgate.reload import ConfigWatcher
from meshgate.runtime import ServiceRuntime
from meshgate.settings import ServeSettings, SettingsError
from meshgate.yamlconf import ConfigError
from ratelimit import metrics
from ratelimit.admin import BackendProbe, build_router
from ratelimit.admin_api import build_v1_router
from ratelimit.backends.base import CounterBackend
from ratelimit.config import RateLimitConfig, load_config
from ratelimit.headers import HeaderMode, parse_mode
from ratelimit.server import add_to_server
from ratelimit.service import RateLimitService

log = logging.getLogger(__name__)

RATELIMIT_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"


@dataclass(frozen=True, slots=True)
class RateLimitOptions:
    """The service's knobs, taken from the process settings (``ServeSettings``)."""

    shadow_mode: bool = False
    headers: HeaderMode = "off"
    backend_timeout_s: float = 0.1
    near_limit_ratio: float = 0.8
    probe_interval_s: float = 2.0

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> RateLimitOptions:
        return cls(
            shadow_mode=settings.shadow_mode,
            headers=parse_mode(settings.ratelimit_headers),
            backend_timeout_s=settings.backend_timeout_s,
            near_limit_ratio=settings.near_limit_ratio,
        )


def backend_name(url: str) -> str:
    """``memory`` or ``redis`` (a bounded metric label; never the URL, which may carry a password)."""
    if url == "memory":
        return "memory"
    if url.lower().startswith(URL_SCHEMES):
        return "redis"
    raise SettingsError(f"--backend / MESHGATE_BACKEND: expected memory or a redis URL ({', '.join(URL_SCHEMES)})")


def make_backend(url: str, *, timeout_s: float) -> CounterBackend:
    if backend_name(url) == "memory":
        from ratelimit.backends.memory import MemoryBackend

        return MemoryBackend()
    from ratelimit.backends.redis import RedisBackend

    try:
        return RedisBackend.from_url(url, timeout_s=timeout_s)
    except ValueError as error:  # a malformed URL; the message never carries the password
        raise SettingsError(f"--backend: {error}") from None


class RateLimitApp:
    """Holds the watched config and the one RateLimitService the transports ask for."""

    def __init__(
        self,
        path: Path,
        backend: CounterBackend,
        *,
        options: RateLimitOptions | None = None,
        reload_interval_s: float = 1.0,
        backend_label: str = "memory",
    ) -> None:
        options = options or RateLimitOptions()
        self.path = path
        self.backend = backend
        self.watcher: ConfigWatcher[RateLimitConfig] = ConfigWatcher(
            load=lambda: load_config(path),
            watched=lambda _current: [path],
            on_swap=self._on_swap,
            component="ratelimit",
            interval_s=reload_interval_s,
        )
        self.service = RateLimitService(
            lambda: self.watcher.current,
            backend,
            shadow_mode_global=options.shadow_mode,
            near_limit_ratio=options.near_limit_ratio,
            headers=options.headers,
            backend_name=backend_label,
        )

    def config(self) -> RateLimitConfig:
        return self.watcher.current

    def get_service(self) -> RateLimitService:
        return self.service

    async def _on_swap(self, new: RateLimitConfig) -> None:
        if not new.domains and self.watcher.current.domains:
            # Every file gone at once is far likelier a botched ConfigMap or volume than a wish to lift every limit
            # (which a file with a domain and no descriptors still says on purpose).
            raise ConfigError(
                str(self.path),
                0,
                "no domain left (every descriptor file is gone); to lift every limit on purpose, "
                "keep a file with a domain and no descriptors",
            )
        metrics.CONFIG_DOMAINS.set(len(new.domains))

    async def start(self) -> None:
        config = self.watcher.load_initial()
        metrics.CONFIG_DOMAINS.set(len(config.domains))
        await self.watcher.start()

    async def close(self) -> None:
        await self.watcher.close()
        await self.backend.close()


async def build_ratelimit(runtime: ServiceRuntime) -> None:
    settings = runtime.settings
    options = RateLimitOptions.from_settings(settings)
    label = backend_name(settings.backend)
    backend = make_backend(settings.backend, timeout_s=options.backend_timeout_s)
    app = RateLimitApp(
        settings.config,
        backend,
        options=options,
        reload_interval_s=settings.reload_interval_s,
        backend_label=label,
    )
    try:
        await app.start()
    except BaseException:
        await backend.close()
        raise
    runtime.on_stop(app.close)
    runtime.readiness.set("config", True)
    probe = BackendProbe(
        backend,
        lambda ok: runtime.readiness.set("backend", ok),
        interval_s=options.probe_interval_s,
        timeout_s=max(options.backend_timeout_s, 0.5),
        backend_name=label,
    )
    runtime.on_start(probe.start)
    runtime.on_stop(probe.close)
    runtime.add_grpc_service(
        RATELIMIT_SERVICE, lambda server: add_to_server(server, app.get_service, deadline_s=settings.deadline_s)
    )

    def config_dict() -> dict[str, Any]:  # one source for /rlconfig and /v1/config
        return app.config().to_dict()

    runtime.add_admin_router(build_router(app.get_service, config_dict))
    allow_remote = settings.admin_allow_remote
    runtime.add_admin_router(v1_router(runtime.info, runtime.readiness, app.watcher, allow_remote=allow_remote))
    runtime.add_admin_router(build_v1_router(app.get_service, config_dict, allow_remote=allow_remote))
    log.info(
        "ratelimit ready",
        extra={"backend": label, "shadow_mode": options.shadow_mode, "headers": options.headers},
    )
