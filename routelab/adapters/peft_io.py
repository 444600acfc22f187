"""peft interoperability: saved peft LoRA folders in, trained experts out, in peft's own format.

A peft LoRA folder holds ``adapter_config.json`` (a ``peft.LoraConfig``) and
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` ``[r, d_in]``
and ``...lora_B.weight`` ``[d_out, r]``; the update is ``scaling * B A x`` with scaling
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA; per-module ``rank_pattern`` /
``alpha_pattern``). ``load_peft_experts`` makes expert ``e`` of every routed layer the
``e``-th folder's adapter (ranks padded with zeros to the largest, which changes nothing;
a module an adapter does not target gets a zero expert there). ``save_peft_expert`` writes
one expert back as a folder that ``peft.PeftModel.from_pretrained`` loads. Needs
``pip install routelab[adapters]`` (peft).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from routelab.adapters.attach import AdapterSet, attach_adapters
from routelab.core import ConfigError, InputError

PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("peft interoperability needs peft: pip install 'routelab[adapters]' (peft>=0.17,<0.22).") from None
    return peft


def pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module name ending in it (regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft_adapter(folder: str | Path) -> tuple[Any, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """``(LoraConfig, {module name: (A [r, d_in], B [d_out, r], scaling)})`` of one saved peft LoRA folder."""
    peft = _peft()
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise InputError(f"{str(folder)!r} is not a saved peft adapter (no adapter_config.json).")
    config = peft.LoraConfig.from_pretrained(str(folder))
    if getattr(config, "peft_type", None) != peft.PeftType.LORA:
        raise InputError(f"{str(folder)!r} holds a {config.peft_type} adapter; only LoRA adapters can be routed.")
    if getattr(config, "use_dora", False) or getattr(config, "bias", "none") != "none" or config.fan_in_fan_out:
        raise InputError(f"{str(folder)!r} uses DoRA, LoRA biases or fan_in_fan_out, which routelab's LoRA experts do not "
                         "represent; use a plain LoRA adapter.")
    from peft.utils import load_peft_weights

    state = load_peft_weights(str(folder), device="cpu")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else key[:-len(".lora_A.weight")]
        b = state.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None or a.dim() != 2 or b.dim() != 2:
            raise InputError(f"{str(folder)!r}: {key} has no matching 2-D lora_B weight (only linear LoRA is supported).")
        rank = int(a.shape[0])
        alpha = float(pattern_value(config.alpha_pattern or {}, name, config.lora_alpha))
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        modules[name] = (a.float(), b.float(), scaling)
    if not modules:
        raise InputError(f"{str(folder)!r} holds no lora_A/lora_B weights.")
    return config, modules


def load_peft_experts(model: nn.Module, folders: Sequence[str | Path], *, method: str = "topk", **attach_options: Any) -> AdapterSet:
    """Attach one routed LoRA expert per saved peft folder to ``model`` (see the module docstring).

    ``method`` and ``attach_options`` go to ``attach_adapters`` (``num_experts``, ``rank`` and
    ``target_modules`` come from the folders).
    """
    if not folders:
        raise ConfigError("folders is empty; give at least one saved peft LoRA folder.")
    adapters = [read_peft_adapter(folder)[1] for folder in folders]
    names = sorted({name for modules in adapters for name in modules})
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [n for n in names if n not in linear]
    if missing:
        raise InputError(f"the adapters target modules the model has no nn.Linear for: {missing[:5]}; load them into the "
                         "base model they were trained on.")
    rank = max(a.shape[0] for modules in adapters for a, _, _ in modules.values())
    target = "|".join(re.escape(n) for n in names)
    adapter_set = attach_adapters(model, target, num_experts=len(folders), rank=rank, method=method, lora_alpha=1.0,
                                  **attach_options)
    with torch.no_grad():
        for name, layer in adapter_set.layers.items():
            bank = layer.bank
            bank.lora_A.zero_()
            bank.lora_B.zero_()
            for expert, modules in enumerate(adapters):
                if name not in modules:
                    continue
                a, b, scaling = modules[name]
                if tuple(a.shape[1:]) != (bank.d_in,) or tuple(b.shape[:1]) != (bank.d_out,):
                    raise InputError(f"adapter {str(folders[expert])!r}: {name} is {a.shape[1]}->{b.shape[0]} but the "
                                     f"model's linear is {bank.d_in}->{bank.d_out}.")
                r = a.shape[0]
                bank.lora_A[expert, :, :r] = a.T.to(bank.lora_A)
                bank.lora_B[expert, :r, :] = b.T.to(bank.lora_B)
                bank.scaling[expert] = scaling
    return adapter_set


def save_peft_expert(adapters: AdapterSet, expert: int, folder: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write expert ``expert`` of every routed layer as a peft LoRA folder; return the folder."""
    peft = _peft()
    from safetensors.torch import save_file

    if not 0 <= expert < adapters.num_experts:
        raise InputError(f"expert={expert} must lie in [0, {adapters.num_experts}).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name, layer in adapters.layers.items():
        bank = layer.bank
        state[f"{PREFIX}{name}.lora_A.weight"] = bank.lora_A[expert].detach().T.contiguous().cpu().float()
        state[f"{PREFIX}{name}.lora_B.weight"] = bank.lora_B[expert].detach().T.contiguous().cpu().float()
        alphas[name] = float(bank.scaling[expert]) * bank.rank
    default_alpha = next(iter(alphas.values()))
    alpha_pattern = {re.escape(n): a for n, a in alphas.items() if a != default_alpha}
    config = peft.LoraConfig(
        r=adapters.rank, lora_alpha=default_alpha, target_modules=list(adapters.layers), alpha_pattern=alpha_pattern,
        lora_dropout=0.0, bias="none", base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(folder))
    save_file(state, str(folder / WEIGHTS_FILE))
    return folder
