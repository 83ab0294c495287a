"""Benchmark-only ports of the keychain_ext flow (not shipped)."""
