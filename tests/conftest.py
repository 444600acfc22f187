"""Shared test configuration."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Two pytest-xdist workers share two cores: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Derandomized so that CI is reproducible; set HYPOTHESIS_PROFILE=explore for fresh examples.
settings.register_profile("routelab", deadline=None, print_blob=True, derandomize=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "routelab"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
