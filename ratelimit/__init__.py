"""Envoy global rate limit service (envoy.service.ratelimit.v3); built in a later issue."""
