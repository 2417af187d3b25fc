"""meshgate load benchmarks: real Envoy in front of do-nothing floors and our services (``python -m bench run``)."""
