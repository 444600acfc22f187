"""docs/routers.md's agreement column covers every registered preset, and only those."""

from __future__ import annotations

import routelab
from routelab.routers.references import REFERENCE_AGREEMENT


def test_every_preset_names_the_reference_it_agrees_with():
    names = {r["name"] for r in routelab.list_routers()}
    assert set(REFERENCE_AGREEMENT) == names
    for name, line in REFERENCE_AGREEMENT.items():
        assert "tests/" in line, f"{name}: say which test checks the agreement"
