"""Choose the linear layers to adapt by module name, as peft's ``target_modules`` does.

A string is a regular expression that must match the whole module name; a list of names
matches a module whose name equals an entry or ends with ``"." + entry`` (so ``"qkv"``
matches ``blocks.0.attn.qkv``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from routelab.core import ConfigError


def name_matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` of every ``nn.Linear`` in ``model`` selected by ``target_modules``."""
    if not target_modules:
        raise ConfigError("target_modules is empty; give module names (e.g. ['qkv', 'out']) or a regular expression.")
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and name_matches(n, target_modules)]
    if not found:
        shown = ", ".join(linear_names[:12]) + (" ..." if len(linear_names) > 12 else "")
        raise ConfigError(f"target_modules={target_modules!r} matches no nn.Linear of the model; its linear layers are: "
                          f"{shown or '(none)'}.")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
