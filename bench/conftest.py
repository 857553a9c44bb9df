"""Shared fixtures for the benchmark suites (bench_*.py; not collected by the plain test run).

Run:   pytest bench/bench_cpu.py                      (timed, pytest-benchmark)
Smoke: pytest bench/bench_*.py --benchmark-disable    (each case once, checks only; CI does this)
"""
import platform

import pytest
import torch

import fastdw


def pytest_report_header(config):
    return (f"fastdw {fastdw.__version__} build {fastdw.build_info()}; torch {torch.__version__}; "
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")


@pytest.fixture
def smoke(benchmark):
    """True when pytest-benchmark is disabled: use the smallest batch, only check numbers."""
    return bool(getattr(benchmark, "disabled", False))
