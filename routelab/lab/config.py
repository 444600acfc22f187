"""Validated settings of training runs and experiments (pydantic models, unknown keys refused).

``TrainConfig`` is one run's optimisation and evaluation schedule; ``ModelSettings`` the
TinyLM shape shared by every router of an experiment (derived from
``TinyLMConfig``, so its fields and defaults are TinyLM's); ``CorpusSettings`` which text to
prepare; ``ExperimentConfig`` a comparison of routers (the file format is in
``routelab.lab.experiment``). Errors become ``ConfigError`` messages that name the field and the fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, TypeVar, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from routelab.core.errors import ConfigError, suggest
from routelab.lab.data import CorpusOptions
from routelab.models.tinylm import TinyLMConfig, shape_fields

M = TypeVar("M", bound=BaseModel)
PRECISIONS = ("fp32", "bf16", "auto")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(Settings):
    """One training run.

    Tokens per optimizer step are ``batch_size * seq_len * grad_accum``. The learning rate
    warms up linearly for ``warmup_steps`` and then follows a cosine down to
    ``min_lr_ratio * lr`` at ``steps``. ``precision='auto'`` picks bf16 autocast on a CPU
    with AMX bf16 tiles, else fp32 (``routelab.lab.train.resolve_precision``; once per run).
    """

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch")
    seq_len: int = Field(256, ge=2)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    eval_every: int = Field(100, ge=1)
    eval_tokens: int = Field(32768, ge=1, description="validation target tokens per evaluation")
    probe_sequences: int = Field(4, ge=1, description="sequences of the fixed routing probe batch")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    keep_checkpoint: bool = Field(False, description="keep the optimizer checkpoint after the run finished")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


class ModelSettingsBase(Settings):
    """The TinyLM shape of an experiment (the router comes from the run, vocab from the tokenizer)."""

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> ModelSettingsBase:
        values = self.top_k if isinstance(self.top_k, list) else [self.top_k]
        for value in values:
            if value is not None and not 1 <= value <= self.num_experts:
                raise ValueError(f"top_k={value} must lie in [1, num_experts={self.num_experts}] (also for dense "
                                 "models, whose width it sets)")
        return self

    def tinylm(self, *, vocab_size: int, max_seq_len: int, router: str | None, router_options: dict[str, Any]) -> TinyLMConfig:
        """The ``TinyLMConfig`` of one run; ``router=None`` (or ``"dense"``) gives the dense equivalent."""
        moe = TinyLMConfig(
            vocab_size=vocab_size,
            max_seq_len=max_seq_len,
            router=router if router not in (None, DENSE) else "mixtral",
            router_options=dict(router_options),
            **self.model_dump(),
        )
        return moe.dense_equivalent() if router in (None, DENSE) else moe


def settings_field(field: dataclasses.Field) -> tuple[Any, Any]:
    """``(annotation, pydantic Field)`` of one ``TinyLMConfig`` shape field: same default, help and bounds."""
    meta = field.metadata
    annotation = Literal[meta["choices"]] if meta["choices"] else get_type_hints(TinyLMConfig)[field.name]
    return annotation, Field(field.default, ge=meta["minimum"], description=meta["help"])


ModelSettings = create_model(
    "ModelSettings",
    __base__=ModelSettingsBase,
    __module__=__name__,
    **{field.name: settings_field(field) for field in shape_fields()},
)
ModelSettings.__doc__ = ModelSettingsBase.__doc__ + " Its fields are ``routelab.models.tinylm.shape_fields()``."


DENSE = "dense"


class CorpusSettings(Settings):
    """Which corpus to prepare (see ``routelab.lab.corpus``)."""

    source: str = "default"
    max_bytes_per_domain: int | None = Field(2_000_000, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    vocab_size: int = Field(8192, ge=257)
    chunk_bytes: int = Field(1 << 20, ge=1024)

    def options(self) -> CorpusOptions:
        return CorpusOptions(**self.model_dump())


class RouterEntry(Settings):
    """A router of an experiment: a preset (or ``dense``), its options and an optional label,
    and optionally a depth router (``routelab.depth``) with its options."""

    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    depth_router: str | None = None
    depth_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> RouterEntry:
        if self.label is not None and not self.label.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"label {self.label!r} may only hold letters, digits, '-', '_' and '.' (it names a folder)")
        return self

    @property
    def key(self) -> str:
        return self.label or self.name


class TOSTSettings(Settings):
    """Equivalence test of each router against the baseline (needs >= 2 seeds)."""

    margin: float = Field(0.02, gt=0, description="equivalence margin in units of the metric")
    metric: Literal["val_loss", "val_ppl"] = "val_loss"
    alpha: float = Field(0.05, gt=0, lt=0.5)
    test: Literal["welch", "student", "paired"] = "welch"


class DepthSettings(Settings):
    """Depth routing of an experiment's runs (``routelab.depth``): the method, its options and
    the options of its second stage (``routelab.lab.depth_stage``); a router entry's own
    ``depth_router``/``depth_options`` take precedence."""

    router: str | None = Field(None, description="a routelab.depth method (mod, gamma-mod, duo, drllm, lff, halting)")
    options: dict[str, Any] = Field(default_factory=dict)
    fit: dict[str, Any] = Field(default_factory=dict, description="options of the method's second stage")

    def apply(self, config: TinyLMConfig, entry: RouterEntry | None = None) -> TinyLMConfig:
        """``config`` with the entry's depth router (or else this section's), if any."""
        if entry is not None and entry.depth_router is not None:
            return dataclasses.replace(config, depth_router=entry.depth_router, depth_options=dict(entry.depth_options))
        if self.router is None:
            return config
        return dataclasses.replace(config, depth_router=self.router, depth_options=dict(self.options))


class ExperimentConfig(Settings):
    """A comparison of routers (see the module docstring for the file format)."""

    name: str = "experiment"
    routers: list[RouterEntry] = Field(min_length=1)
    baseline: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    corpus: CorpusSettings = Field(default_factory=CorpusSettings)
    tost: TOSTSettings = Field(default_factory=TOSTSettings)
    depth: DepthSettings = Field(default_factory=DepthSettings)
    out_dir: str = "runs"
    seed_noise_std: float | None = Field(
        None, gt=0, description="std of one run's val_loss across seeds at these settings; marks leaderboard gaps "
        "within seed noise when the experiment has a single seed (routelab.lab.seed_noise)")

    @field_validator("routers", mode="before")
    @classmethod
    def _router_strings(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("name may only hold letters, digits, '-', '_' and '.' (it names a folder)")
        return value

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        keys = [r.key for r in self.routers]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"router labels must be unique, {duplicates} repeat; give each entry a distinct 'label'")
        if self.baseline is not None and self.baseline not in keys:
            raise ValueError(f"baseline {self.baseline!r} is not one of the routers {keys}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        if any(seed < 0 for seed in self.seeds):
            raise ValueError(f"seeds must be >= 0, got {self.seeds}")
        return self

    @property
    def baseline_key(self) -> str:
        return self.baseline or self.routers[0].key

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) / self.name

    def run_folder(self, entry: RouterEntry, seed: int) -> Path:
        return self.folder / f"{entry.key}-seed{seed}"


def model_at(model: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The settings class that holds the field at ``path`` (list indices are stepped over)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates for c in [c, *getattr(c, "__args__", ())]
                  if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        current = nested[0]
    return current


def format_validation_error(error: ValidationError, where: str, model: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        owner = model_at(model, tuple(item["loc"][:-1])) if item["type"] == "extra_forbidden" else None
        if owner is not None:
            field_names = list(owner.model_fields)
            message = f"unknown setting.{suggest(str(item['loc'][-1]), field_names)} Valid: {', '.join(field_names)}"
        lines.append(f"  {location}: {message} (got {item.get('input')!r})")
    return f"invalid {where}:\n" + "\n".join(lines)


def validated(model: type[M], data: Any, where: str) -> M:
    """``model.model_validate(data)`` with errors turned into a ``ConfigError`` naming ``where``."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, where, model)) from None
