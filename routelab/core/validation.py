"""Argument checks shared by routers and layers; each raises a message naming the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from routelab.core.errors import ConfigError, InputError


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}.")
    return value


def check_top_k(top_k: object, num_experts: int, name: str = "top_k") -> int:
    top_k = check_positive_int(name, top_k)
    if top_k > num_experts:
        raise ConfigError(
            f"{name}={top_k} is larger than num_experts={num_experts}: a token cannot pick more "
            f"experts than exist. Use {name} <= {num_experts} or add experts."
        )
    return top_k


def as_float(name: str, value: object) -> float:
    """``float(value)`` for a real number (or a one-element tensor); anything else (a string, a
    bool) raises ``ConfigError`` naming ``name``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}.")
    return float(value)


def check_probability(name: str, value: float, *, open_low: bool = False) -> float:
    value = as_float(name, value)
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1) or math.isnan(value):
        bound = "(0, 1]" if open_low else "[0, 1]"
        raise ConfigError(f"{name} must lie in {bound}, got {value}.")
    return value


def check_non_negative(name: str, value: float) -> float:
    value = as_float(name, value)
    if not value >= 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}.")
    return value


def check_capacity_factor(value: float | None, name: str = "capacity_factor") -> float | None:
    if value is None:
        return None
    value = as_float(name, value)
    if not value > 0 or math.isinf(value):
        raise ConfigError(
            f"{name} must be > 0 (or None for dropless routing), got {value}. "
            "Typical values are 1.0-1.25 in training and 2.0 in evaluation."
        )
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        from routelab.core.errors import suggest

        raise ConfigError(f"{name}={value!r} must be one of {choices}.{suggest(str(value), choices)}")
    return value


def check_activations(x: torch.Tensor, d_model: int, name: str = "x", *, finite: bool = True) -> None:
    """Check a ``[batch, seq, d_model]`` floating tensor; optionally that it holds no NaN/Inf."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape [batch, seq, {d_model}], got {type(x).__name__}.")
    if x.dim() != 3:
        raise InputError(
            f"{name} must have shape [batch, seq, d_model] (3 dimensions), got shape {tuple(x.shape)}. "
            f"Reshape a [tokens, d_model] tensor with {name}.unsqueeze(0)."
        )
    if x.shape[-1] != d_model:
        raise InputError(f"{name} has width {x.shape[-1]} but the layer was built with d_model={d_model}.")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating tensor (float32/bfloat16/float16/float64), got {x.dtype}.")
    bad = non_finite_count(x) if finite else 0
    if bad:
        raise InputError(
            f"{name} contains {bad} NaN/Inf values; the MoE layer refuses to route them. "
            "Check the layers before it (or pass check_inputs=False to skip this check)."
        )


def check_token_tensor(name: str, t: torch.Tensor | None, batch: int, seq: int, *, dtype_kind: str) -> None:
    """Check an optional ``[batch, seq]`` tensor: ``dtype_kind`` is 'bool' or 'int'."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape [{batch}, {seq}], got {type(t).__name__}.")
    if tuple(t.shape) != (batch, seq):
        raise InputError(f"{name} must have shape [batch, seq] = [{batch}, {seq}], got {tuple(t.shape)}.")
    if dtype_kind == "bool" and t.dtype != torch.bool:
        raise InputError(f"{name} must be a bool tensor (True = real token), got {t.dtype}. Use {name}.bool().")
    if dtype_kind == "int" and (t.is_floating_point() or t.dtype == torch.bool or t.is_complex()):
        raise InputError(f"{name} must be an integer tensor of token ids, got {t.dtype}. Use {name}.long().")
    if dtype_kind == "int" and t.numel() and int(t.min()) < 0:
        raise InputError(f"{name} holds negative ids (min {int(t.min())}); token ids must be >= 0.")


_LAYER_CHECKED_INPUTS: ContextVar[bool] = ContextVar("routelab_layer_checked_inputs", default=False)


@contextmanager
def inputs_checked_by_layer() -> Iterator[None]:
    """Within this block routers skip their input checks: the calling layer already ran them
    (including its own ``check_inputs`` choice), so the tensor is not scanned twice."""
    token = _LAYER_CHECKED_INPUTS.set(True)
    try:
        yield
    finally:
        _LAYER_CHECKED_INPUTS.reset(token)


def check_router_input(x: object, d_model: int | None, name: str = "x") -> None:
    """Check the ``[tokens, d_model]`` input of a router called on its own: a floating tensor of
    the router's width without NaN/Inf (the checks the MoE layer runs on its input)."""
    if _LAYER_CHECKED_INPUTS.get():
        return
    width = d_model if d_model is not None else "d_model"
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape [tokens, {width}], got {type(x).__name__}.")
    if x.dim() != 2:
        raise InputError(
            f"{name} must have shape [tokens, d_model] (2 dimensions: a router sees a flat list of tokens), got "
            f"shape {tuple(x.shape)}. Flatten it with {name}.reshape(-1, {name}.shape[-1]), or use routelab.MoE "
            "for [batch, seq, d_model] input."
        )
    if d_model is not None and x.shape[-1] != d_model:
        raise InputError(f"{name} has width {x.shape[-1]} but the router was built with d_model={d_model}.")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating tensor (float32/bfloat16/float16/float64), got {x.dtype}.")
    bad = non_finite_count(x)
    if bad:
        raise InputError(f"{name} contains {bad} NaN/Inf values; a router refuses to route them. Check the layers "
                         "before it.")


def non_finite_count(x: torch.Tensor) -> int:
    """How many NaN/Inf values ``x`` holds. One summing pass decides the common case (a NaN or
    an Inf makes the sum non-finite); only then are the values counted one by one, so a
    finite sum that overflowed is counted exactly too. On CPU the sum is 20-30x faster than
    ``torch.isfinite(x).all()``, which materialises a mask (4096 x 512: 0.18 against 3.45 ms
    in fp32, 0.16 against 5.12 ms in bf16)."""
    if not x.numel() or bool(torch.isfinite(x.sum())):
        return 0
    return int((~torch.isfinite(x)).sum())


def check_option_type(owner: str, key: str, value: object, default: object) -> None:
    """Refuse an option value whose type does not match its default's (a string for a number, a
    number for a flag, ...) with a message naming the option; ``None`` defaults accept anything."""
    if default is None or value is None and not isinstance(default, bool):
        return
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise ConfigError(f"{owner} option {key}={value!r} must be {expected} (default {default!r}).")
