"""Helpers shared by several test modules of both tiers (tests/unit, tests/mount).

Plain functions, classes and constants only; fixtures live in tests/conftest.py. A
helper that one test module uses stays in that module. `mounting` is the bench's too
(scripts/benchkit imports it): it imports neither pytest nor conftest.
"""
