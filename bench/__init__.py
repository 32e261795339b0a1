"""Benchmarks (run as scripts: ``python bench/<name>.py``).

A package only so that tests can import their drivers, e.g. ``from bench.load import
run_load`` in ``tests/test_load_smoke.py``; nothing here is part of the installed library.
"""
