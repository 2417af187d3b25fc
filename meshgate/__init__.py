"""meshgate: external authorization and global rate limiting for Envoy and Istio (shared runtime and CLI)."""

__version__ = "0.1.0"
