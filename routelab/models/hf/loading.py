"""Loading a pretrained transformers MoE checkpoint (and its tokenizer) from local files only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_local_model(path_or_name: str, what: str = "checkpoint") -> None:
    """Refuse, before transformers is asked, a folder that does not exist (or is a file) and
    a name that is neither a folder nor in the local Hugging Face cache."""
    where = str(path_or_name)
    path = Path(where).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{what} {where!r} is a file; pass the folder written by save_pretrained.")
        return
    looks_like_hub_name = where.count("/") <= 1 and not where.startswith((".", "/", "~")) and not where.endswith("/")
    if looks_like_hub_name:
        try:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(where, "config.json"), str):
                return
        except Exception:  # noqa: BLE001 - an invalid repo id or an old hub library: treat as not cached
            pass
        raise ConfigError(
            f"{what} {where!r} is neither an existing folder nor a model in the local Hugging Face cache; pass the "
            f"folder written by save_pretrained, or download it first (huggingface-cli download {where} --local-dir DIR)."
        )
    raise ConfigError(f"{what} folder {where!r} does not exist.")


def load_pretrained(path_or_name: str, *, dtype: str = "float32") -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on a local directory (or a name already in the
    Hugging Face cache), never downloading; the model is returned in eval mode."""
    from transformers import AutoModelForCausalLM

    check_choice("dtype", dtype, tuple(DTYPES))
    check_local_model(path_or_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_name), local_files_only=True, dtype=DTYPES[dtype])
    except OSError as err:
        raise ConfigError(
            f"cannot load {str(path_or_name)!r} from local files: {err}. Pass a directory written by "
            "save_pretrained (config.json + weights), or download the checkpoint first, e.g. "
            f"`huggingface-cli download {path_or_name} --local-dir DIR`."
        ) from err
    return model.eval()


def load_tokenizer(path_or_name: str) -> Any:
    """The tokenizer saved with the checkpoint (local files only)."""
    from transformers import AutoTokenizer

    check_local_model(path_or_name, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(path_or_name), local_files_only=True)
    except (OSError, ValueError) as err:
        where = str(path_or_name)
        hint = "" if Path(where).is_dir() else " (it is not a local directory)"
        raise ConfigError(
            f"no tokenizer found for {where!r}{hint}: {err}. Save the tokenizer next to the model "
            "(tokenizer.save_pretrained(DIR)) or pass --tokenizer DIR."
        ) from err
