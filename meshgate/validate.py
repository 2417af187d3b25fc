"""``meshgate validate``: check a config file the way the server would load it, without serving."""

from __future__ import annotations

from pathlib import Path

from meshgate import yamlconf
from meshgate.yamlconf import ConfigError


def validate_path(path: Path) -> str:
    """Load ``path`` fully (and every file it names); return a one-line summary or raise ConfigError."""
    if path.is_dir():
        raise ConfigError(str(path), 0, "ratelimit descriptor directories are not supported yet")
    document = yamlconf.load(path)
    if isinstance(document, dict) and "domain" in document:
        raise ConfigError(str(path), 0, "ratelimit descriptor files are not supported yet")
    from extauthz.app import build_pipeline
    from extauthz.identity.jwks import JwksRegistry
    from extauthz.pipeline import NullObserver

    pipeline = build_pipeline(path, JwksRegistry(), observer=NullObserver())
    kinds = ", ".join(provider.kind.value for provider in pipeline.providers) or "none"
    return f"extauthz policy; identity providers: {kinds}"
