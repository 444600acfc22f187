"""Validated settings of training runs and experiments (pydantic models, unknown keys refused).

``TrainConfig`` is one run's optimisation and evaluation schedule; ``ModelSettings`` the
TinyLM shape shared by every router of an experiment; ``CorpusSettings`` which text to
prepare. Errors become ``ConfigError`` messages that name the field and the fix.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from routelab.core.errors import ConfigError, suggest
from routelab.lab.data import CorpusOptions
from routelab.models.tinylm import TinyLMConfig

M = TypeVar("M", bound=BaseModel)
PRECISIONS = ("fp32", "bf16", "auto")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(Settings):
    """One training run.

    Tokens per optimizer step are ``batch_size * seq_len * grad_accum``. The learning rate
    warms up linearly for ``warmup_steps`` and then follows a cosine down to
    ``min_lr_ratio * lr`` at ``steps``. ``precision='auto'`` picks bf16 autocast when
    this machine runs bf16 matmuls faster than fp32, else fp32 (decided once per run).
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
    seed: int = 0
    keep_checkpoint: bool = Field(False, description="keep the optimizer checkpoint after the run finished")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


class ModelSettings(Settings):
    """The TinyLM shape of an experiment (the router comes from the run, vocab from the tokenizer)."""

    d_model: int = Field(128, ge=2)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    d_ff: int | None = Field(None, ge=1)
    num_experts: int = Field(8, ge=1)
    top_k: int | list[int] | None = 2
    expert_d_hidden: int | None = Field(None, ge=1)
    moe_every: int = Field(1, ge=1)
    num_shared_experts: int = Field(0, ge=0)
    shared_d_hidden: int | None = Field(None, ge=1)
    activation: Literal["swiglu", "gelu"] = "swiglu"
    objective: Literal["causal", "masked-diffusion"] = "causal"

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
    """A router of an experiment: a preset (or ``dense``), its options and an optional label."""

    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> RouterEntry:
        if self.label is not None and not self.label.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"label {self.label!r} may only hold letters, digits, '-', '_' and '.' (it names a folder)")
        return self

    @property
    def key(self) -> str:
        return self.label or self.name


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
