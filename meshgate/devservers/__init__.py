"""Small local servers for tests, the demo and the bench (a JWKS/OIDC issuer); never used in production paths."""
