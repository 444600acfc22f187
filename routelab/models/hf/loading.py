"""Loading a pretrained transformers MoE checkpoint (and its tokenizer) from local files only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pretrained(path_or_name: str, *, dtype: str = "float32") -> Any:
    """``AutoModelForCausalLM.from_pretrained`` on a local directory (or a name already in the
    Hugging Face cache), never downloading; the model is returned in eval mode."""
    from transformers import AutoModelForCausalLM

    check_choice("dtype", dtype, tuple(DTYPES))
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

    try:
        return AutoTokenizer.from_pretrained(str(path_or_name), local_files_only=True)
    except (OSError, ValueError) as err:
        where = str(path_or_name)
        hint = "" if Path(where).is_dir() else " (it is not a local directory)"
        raise ConfigError(
            f"no tokenizer found for {where!r}{hint}: {err}. Save the tokenizer next to the model "
            "(tokenizer.save_pretrained(DIR)) or pass --tokenizer DIR."
        ) from err
