"""Launchers for tests and benchmarks: `lstmserve` and redis-server as child processes on loopback.

Shared by `tests/` and `bench/` so that neither imports the other; the server itself never uses this package.
"""
