"""Test-wide fixtures: real redis-server processes (standalone, 3-master Cluster, Sentinel) on loopback ports."""

pytest_plugins = ["tests.support.redis_servers"]
