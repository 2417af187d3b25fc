"""Envoy external authorization: identity (JWT, API keys, SPIFFE) -> RBAC policy -> decision."""
