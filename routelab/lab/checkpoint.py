"""Checkpoints: written atomically, self-contained, loadable without the run's config files.

Two kinds of file, both ``torch.save`` dicts loadable with ``weights_only=True``:

* ``checkpoint.pt`` (training state): model, optimizer, scheduler, RNG states (torch,
  numpy, python), the data position (the step; batches are a function of seed and step),
  running totals and the routing of the probe batch at the last evaluation;
* ``model.pt`` (final model): model weights and what is needed to use them.

Both carry ``model_config``, ``train_config``, the corpus description and the tokenizer
JSON, so ``load_model(path)`` rebuilds the model and its tokenizer from the file alone.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routelab.core.errors import InputError
from routelab.lab.tokenizer import TextTokenizer
from routelab.models.tinylm import TinyLM, TinyLMConfig

CHECKPOINT_FORMAT = "routelab.tinylm.checkpoint"
MODEL_FORMAT = "routelab.tinylm.model"
FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"


def atomic_save(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    The payload is serialised in memory first and written with plain file I/O, so that a
    full disk is reported as the operating system's ``OSError`` (ENOSPC) naming the file,
    not as an opaque serialiser error; the previous file at ``path`` stays intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # name the file the user knows, not the temporary one
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict[str, Any]:
    """The torch, numpy and python global RNG states, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or model file (tensors on CPU), with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file; torch's own advice (weights_only=False) is unsafe here
        raise InputError(
            f"{str(path)!r} is not a routelab checkpoint (it cannot be read as one: {type(error).__name__}); pass a "
            "model.pt or checkpoint.pt written by `routelab train`, or its run folder."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") not in (CHECKPOINT_FORMAT, MODEL_FORMAT):
        raise InputError(f"{str(path)!r} is not a routelab TinyLM checkpoint (no routelab format tag).")
    if payload.get("version", 0) > FORMAT_VERSION:
        raise InputError(f"{str(path)!r} was written by a newer routelab (format version {payload['version']}).")
    return payload


def resolve_model_path(path: str | Path) -> Path:
    """A run folder resolves to its ``model.pt``, else its ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, CHECKPOINT_FILE):
            if (path / name).is_file():
                return path / name
        raise InputError(f"run folder {str(path)!r} holds neither {MODEL_FILE} nor {CHECKPOINT_FILE}.")
    return path


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[TinyLM, TextTokenizer, dict[str, Any]]:
    """Rebuild a trained TinyLM, its tokenizer and its metadata from a checkpoint.

    Args:
        path: a ``model.pt`` / ``checkpoint.pt`` file or a run folder.
        device: where to put the model.

    Returns:
        ``(model, tokenizer, metadata)`` with the model in eval mode; ``metadata`` holds
        ``name`` (the run folder), ``path``, ``tokenizer_hash``, ``model_config``,
        ``train_config``, ``corpus``, ``step`` and ``router``.
    """
    file = resolve_model_path(path)
    payload = read_checkpoint(file)
    config = TinyLMConfig.from_dict(payload["model_config"])
    model = TinyLM(config)
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    tokenizer = TextTokenizer.from_json(payload["tokenizer"])
    metadata = {
        "name": file.parent.name if file.name in (MODEL_FILE, CHECKPOINT_FILE) else file.stem,
        "path": str(file),
        "tokenizer_hash": tokenizer.content_hash(),
        "model_config": payload["model_config"],
        "train_config": payload.get("train_config", {}),
        "corpus": payload.get("corpus", {}),
        "step": int(payload.get("step", 0)),
        "router": config.router if config.ffn == "moe" else "dense",
    }
    return model, tokenizer, metadata
