"""Experiments: train every router x seed on the same data and token budget, then report.

An experiment file (YAML or TOML) holds::

    name: my-comparison          # results go to <out_dir>/<name>/
    routers: [mixtral, loss-free, {name: expert-choice, label: ec-cf2, options: {capacity_factor: 2.0}}]
    baseline: mixtral            # TOST reference (default: the first router)
    seeds: [0, 1]
    model: {d_model: 128, n_layers: 4, num_experts: 8, top_k: 2}
    train: {steps: 500, batch_size: 16, seq_len: 256, lr: 0.002}
    corpus: {source: default, max_bytes_per_domain: 2000000, vocab_size: 8192}
    tost: {margin: 0.02, metric: val_loss, alpha: 0.05, test: welch}

Every run is ``<out_dir>/<name>/<label>-seed<k>/``. Finished runs are skipped and
partial ones resumed, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from routelab.core.atomic_files import atomic_write_json
from routelab.core.errors import ConfigError
from routelab.core.run_lock import holds_folder_lock
from routelab.lab.config import DENSE, ExperimentConfig, RouterEntry, validated
from routelab.lab.data import PreparedCorpus, prepare_corpus
from routelab.lab.report import write_report
from routelab.lab.train import RunFiles, train_run
from routelab.routers.registry import create_router


def toml_module():  # noqa: ANN201 - a module
    """``tomllib`` (Python 3.11+) or, before 3.11, ``tomli`` when installed."""
    try:
        import tomllib

        return tomllib
    except ModuleNotFoundError:
        try:
            import tomli

            return tomli
        except ModuleNotFoundError:
            raise ConfigError("TOML experiment files need Python 3.11+ (or `pip install tomli`); use YAML instead.") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml``/``.toml`` experiment file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist.")
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"experiment file {str(path)!r} must end in .yaml, .yml or .toml.")
    try:
        text = path.read_text(encoding="utf-8")
        data = toml_module().loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as error:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot parse {str(path)!r}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of settings (name, routers, seeds, model, train, ...).")
    return data


def check_routers(config: ExperimentConfig) -> None:
    """Build every router once, so unknown presets or options fail before any training."""
    for entry in config.routers:
        if entry.name == DENSE:
            if entry.options:
                raise ConfigError(f"router 'dense' takes no options, got {sorted(entry.options)}.")
            continue
        top_k = config.model.top_k
        try:
            create_router(
                entry.name,
                d_model=config.model.d_model,
                num_experts=config.model.num_experts,
                top_k=top_k[0] if isinstance(top_k, list) else top_k,
                **entry.options,
            )
        except ConfigError as error:
            raise ConfigError(f"router entry {entry.key!r}: {error}") from None


def load_experiment(source: str | Path | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Validate an experiment from a file or a mapping, with ``overrides`` merged section by section."""
    data: dict[str, Any] = {}
    where = "experiment settings"
    if isinstance(source, dict):
        data = dict(source)
    elif source is not None:
        data = read_config_file(source)
        where = f"experiment file {str(source)!r}"
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    if "routers" not in data:
        raise ConfigError(f"{where} lists no routers: add e.g. `routers: [mixtral, loss-free]` or pass --routers.")
    config = validated(ExperimentConfig, data, where)
    check_routers(config)
    return config


@holds_folder_lock(lambda config, **kwargs: config.folder, "experiment folder")
def run_experiment(
    config: ExperimentConfig,
    *,
    console: Console | None = None,
    show_progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train all runs (skipping finished ones, resuming partial ones), then write the report.

    Returns the report summary (see ``routelab.lab.report.write_report``).
    """
    console = console or Console(stderr=True)
    start = time.perf_counter()
    with console.status("preparing the corpus and tokenizer ..."):
        prep_start = time.perf_counter()
        corpus = prepare_corpus(config.corpus.options(), cache_dir=cache_dir)
        prep_time = time.perf_counter() - prep_start
    for entry in config.routers:  # every model shape is checked before anything is written
        config.model.tinylm(vocab_size=corpus.vocab_size, max_seq_len=config.train.seq_len, router=entry.name,
                            router_options=entry.options)
    atomic_write_json(config.folder / "experiment.json", config.model_dump())
    tokens = corpus.meta["num_tokens"]
    console.print(
        f"corpus {corpus.meta['source']!r}: domains {corpus.domains}, {tokens['train']:,} train / {tokens['val']:,} val "
        f"tokens, vocab {corpus.vocab_size} ({prep_time:.1f} s)"
    )
    runs = []
    total = len(config.routers) * len(config.seeds)
    for index, (seed, entry) in enumerate((s, e) for s in config.seeds for e in config.routers):
        folder = config.run_folder(entry, seed)
        status = "done" if RunFiles(folder).finished() else ("resuming" if RunFiles(folder).checkpoint.is_file() else "")
        console.print(f"[{index + 1}/{total}] {entry.key} seed {seed} {('(' + status + ')') if status else ''}")
        summary = train_one(config, entry, seed, corpus, console=console, show_progress=show_progress)
        runs.append({"key": entry.key, "router": entry.name, "seed": seed, "folder": str(folder), "summary": summary})
    return write_report(config, corpus, runs, wall_time_s=time.perf_counter() - start, console=console)


def train_one(
    config: ExperimentConfig,
    entry: RouterEntry,
    seed: int,
    corpus: PreparedCorpus,
    *,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume, or return) the run of ``entry`` with ``seed``."""
    model_config = config.model.tinylm(
        vocab_size=corpus.vocab_size,
        max_seq_len=config.train.seq_len,
        router=entry.name,
        router_options=entry.options,
    )
    train_config = config.train.model_copy(update={"seed": seed})
    try:
        return train_run(
            config.run_folder(entry, seed), corpus, model_config, train_config,
            resume=True, console=console, show_progress=show_progress, label=f"{entry.key} s{seed}",
        )
    except ConfigError as error:
        if "cannot resume" in str(error):
            raise ConfigError(
                f"{error} The experiment {config.name!r} already has runs with other settings in "
                f"{str(config.folder)!r}: use another name (--name) or delete that folder."
            ) from None
        raise
