"""``meshgate validate``: check a config file the way the server would load it, without serving."""

from __future__ import annotations

from pathlib import Path

from meshgate import yamlconf


def validate_path(path: Path) -> str:
    """Load ``path`` fully (and every file it names); return a one-line summary or raise ConfigError."""
    if path.is_dir():
        return _ratelimit_summary(path)
    document = yamlconf.load(path)
    if isinstance(document, dict) and "domain" in document:
        return _ratelimit_summary(path)
    if isinstance(document, dict) and "clients" in document:
        return _api_keys_summary(path)
    from extauthz.app import build_pipeline
    from extauthz.identity.jwks import JwksRegistry
    from extauthz.pipeline import NullObserver

    pipeline = build_pipeline(path, JwksRegistry(), observer=NullObserver())
    kinds = ", ".join(provider.kind.value for provider in pipeline.providers) or "none"
    return f"extauthz policy; identity providers: {kinds}"


def _ratelimit_summary(path: Path) -> str:
    """A descriptor file (``domain:`` at the top) or a directory of them, loaded as the ratelimit server does."""
    from ratelimit.config import load_config

    config = load_config(path)
    domains = ", ".join(sorted(config.domains)) or "none"
    return f"ratelimit config; domains: {domains}"


def _api_keys_summary(path: Path) -> str:
    """An API-keys file (``clients:`` at the top), checked as the policy's ``api_key.keys_file`` is."""
    from extauthz.identity.apikey import load_api_keys

    keys = list(load_api_keys(path))
    clients = len({entry.client for entry in keys})
    return f"api keys file; {clients} clients, {len(keys)} keys"
