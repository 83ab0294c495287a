"""Helpers for demos and tests: a throwaway PKI and TLS servers that demand
client certificates. They need the ``cryptography`` package (and, for
:class:`~keychain_ext.testing.server.NginxServer`, an ``nginx`` binary)."""
