"""Shared test helpers: invariant oracles, effects files, process utilities."""
