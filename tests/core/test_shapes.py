"""Every tensor-name suffix in the package uses only the shape letters of ``routelab.core.shapes``."""

from __future__ import annotations

import re
from pathlib import Path

import routelab
from routelab.core.shapes import SHAPE_LETTERS

# a lower-case identifier, then _ and 1-5 capital letters (optionally a trailing head width d)
SUFFIX = re.compile(r"\b[a-z][a-z0-9_]*?_([A-Z]{1,5})d?\b")


def test_every_shape_suffix_uses_the_legend() -> None:
    root = Path(routelab.__file__).parent
    unknown = {}
    for path in root.rglob("*.py"):
        for letters in SUFFIX.findall(path.read_text()):
            for letter in set(letters) - set(SHAPE_LETTERS):
                unknown.setdefault(letter, set()).add(str(path.relative_to(root)))
    assert not unknown, f"shape letters missing from routelab.core.shapes: {unknown}"


def test_each_letter_has_one_meaning() -> None:
    assert all(len(letter) == 1 and letter.isupper() for letter in SHAPE_LETTERS)
    assert len(set(SHAPE_LETTERS.values())) == len(SHAPE_LETTERS)
