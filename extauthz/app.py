"""Composition root of extauthz: policy file -> providers + compiled policy -> Pipeline, served on both transports.

A policy reload builds a whole new Pipeline and swaps it in atomically; JWKS caches live in a registry that
outlives pipelines, so a reload never drops cached keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from extauthz.admin_api import build_v1_router
from extauthz.audit import AuditObserver
from extauthz.config import ExtauthzConfig
from extauthz.config_loader import load_config
from extauthz.grpc_adapter import add_to_server
from extauthz.http_adapter import start_http_listener
from extauthz.identity.apikey import ApiKeyProvider, load_api_keys
from extauthz.identity.base import IdentityProvider
from extauthz.identity.introspection import IntrospectionProvider, IntrospectionRegistry
from extauthz.identity.jwks import JwksRegistry
from extauthz.identity.jwt import JwtProvider
from extauthz.identity.mtls import SpiffeProvider
from extauthz.model import IdentityKind
from extauthz.pipeline import DecisionObserver, Pipeline
from extauthz.policy import compile_policy
from meshgate.admin_api import v1_router
from meshgate.reload import ConfigWatcher
from meshgate.runtime import ServiceRuntime

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


def build_providers(
    config: ExtauthzConfig, registry: JwksRegistry, introspection: IntrospectionRegistry | None = None
) -> list[IdentityProvider]:
    """The configured identity providers, in the policy's order; unconfigured ones are left out.

    ``registry`` and ``introspection`` hold what outlives a reload (JWKS keys, introspected tokens); without
    ``introspection`` the introspection provider keeps its own.
    """
    identity = config.identity
    jwt = JwtProvider(identity.jwt, registry) if identity.jwt.issuers and IdentityKind.JWT in identity.order else None
    providers: list[IdentityProvider] = []
    for kind in identity.order:
        if kind is IdentityKind.JWT and jwt is not None:
            providers.append(jwt)
        elif kind is IdentityKind.INTROSPECTION and identity.introspection.endpoint:
            settings = identity.introspection
            state = introspection.get_or_create(settings) if introspection is not None else None
            # A configured issuer's JWT is the JWT provider's to judge: never sent to the endpoint.
            providers.append(IntrospectionProvider(settings, state, skip=jwt.owns if jwt is not None else None))
        elif kind is IdentityKind.API_KEY and identity.api_key.keys_file:
            providers.append(ApiKeyProvider(identity.api_key, load_api_keys(identity.api_key.keys_file)))
        elif kind is IdentityKind.SPIFFE:
            providers.append(SpiffeProvider(identity.spiffe))
    return providers


def build_pipeline(
    path: Path,
    registry: JwksRegistry,
    *,
    introspection: IntrospectionRegistry | None = None,
    deadline_s: float = 1.0,
    observer: DecisionObserver | None = None,
) -> Pipeline:
    """Load and check everything a policy file names; raises ConfigError (file:line) on any problem."""
    config = load_config(path)
    return Pipeline(
        build_providers(config, registry, introspection),
        compile_policy(config.rules),
        config.response,
        observer=observer or AuditObserver(config.audit),
        deadline_s=deadline_s,
    )


def watched_files(path: Path, pipeline: Pipeline | None) -> Sequence[Path]:
    """The policy file, and the files it names: the API-keys file (rotating keys is a reload too) and the CA
    bundles (a Kubernetes secret is updated in place)."""
    files = [path]
    if pipeline is not None:
        for provider in pipeline.providers:
            if isinstance(provider, ApiKeyProvider):
                files.append(Path(provider.settings.keys_file))
            elif isinstance(provider, IntrospectionProvider) and provider.settings.ca_file:
                files.append(Path(provider.settings.ca_file))
            elif isinstance(provider, JwtProvider):
                files.extend(Path(issuer.ca_file) for issuer in provider.settings.issuers if issuer.ca_file)
    return files


class ExtauthzService:
    """Holds the current pipeline; the transports ask it for the pipeline on every call."""

    def __init__(self, path: Path, *, deadline_s: float, reload_interval_s: float) -> None:
        self.path = path
        self.registry = JwksRegistry()
        self.introspection = IntrospectionRegistry()
        self.watcher: ConfigWatcher[Pipeline] = ConfigWatcher(
            load=lambda: build_pipeline(path, self.registry, introspection=self.introspection, deadline_s=deadline_s),
            watched=lambda current: watched_files(path, current),
            on_swap=self._on_swap,
            component="extauthz",
            interval_s=reload_interval_s,
        )

    def pipeline(self) -> Pipeline:
        return self.watcher.current

    async def _on_swap(self, new: Pipeline) -> None:
        """Start the new pipeline before it serves; release JWKS caches that no issuer uses any more."""
        await new.start()
        await self.registry.retain(
            cache for provider in new.providers if isinstance(provider, JwtProvider) for cache in provider.caches
        )
        await self.introspection.retain(
            provider.state for provider in new.providers if isinstance(provider, IntrospectionProvider)
        )
        # The pipeline being replaced records the repeats it answered now: no await follows, so none comes after.
        self.watcher.current.record_recalled()

    async def start(self) -> None:
        self.watcher.load_initial()
        await self.watcher.current.start()
        await self.watcher.start()

    async def close(self) -> None:
        await self.watcher.close()
        await self.watcher.current.close()
        await self.registry.close()
        await self.introspection.close()


async def build_extauthz(runtime: ServiceRuntime) -> None:
    settings = runtime.settings
    service = ExtauthzService(
        settings.config, deadline_s=settings.deadline_s, reload_interval_s=settings.reload_interval_s
    )
    await service.start()
    runtime.on_stop(service.close)
    runtime.add_grpc_service(AUTHORIZATION_SERVICE, lambda server: add_to_server(server, service.pipeline))
    allow_remote = settings.admin_allow_remote
    runtime.add_admin_router(v1_router(runtime.info, runtime.readiness, service.watcher, allow_remote=allow_remote))
    runtime.add_admin_router(build_v1_router(service.pipeline, settings.config, allow_remote=allow_remote))
    if settings.http_port >= 0:
        runtime.add_listener("http", lambda: start_http_listener(settings.host, settings.http_port, service.pipeline))
