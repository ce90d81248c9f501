"""Shared fixtures. Helpers live in tests/support/ (tiny models, redis, servers)."""
