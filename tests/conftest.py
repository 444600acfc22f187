"""Shared test configuration."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Two pytest-xdist workers share two cores: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("routelab", deadline=None, print_blob=True)
settings.load_profile("routelab")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
