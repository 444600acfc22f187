"""The pretrained MoE architectures routelab can attach to, recognised by class.

Each entry names the transformers module and classes of one architecture, where its
router sits in a decoder layer, and the dtypes its router returns (a replacement router
returns the same, so the experts compute exactly what they computed before). Classes are
imported lazily: transformers is only needed when a model is attached.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from routelab.core.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """One supported transformers MoE architecture.

    Attributes:
        name: short name (``mixtral``, ``olmoe``, ...).
        module: the transformers modeling module.
        pretrained_class: the ``*PreTrainedModel`` base class every model of the family derives from.
        router_class: the router module class (``output_router_logits`` collects by this class).
        router_attr: attribute of a decoder layer's ``mlp`` that holds the router.
        rule: the router's selection and gate rule in words.
        logits_fp32: the router returns fp32 logits whatever the model dtype.
        weights_model_dtype: the router returns its gate weights in the model dtype (else fp32).
    """

    name: str
    module: str
    pretrained_class: str
    router_class: str
    router_attr: str
    rule: str
    logits_fp32: bool = False
    weights_model_dtype: bool = True

    def load(self, attribute: str) -> type | None:
        """The class ``attribute`` of this architecture's module, or None if transformers lacks it."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return None
        return getattr(module, attribute, None)

    def router_type(self) -> type:
        router_type = self.load(self.router_class)
        if router_type is None:  # pragma: no cover - only with an incompatible transformers
            raise ConfigError(f"transformers has no {self.router_class}; routelab needs transformers >= 5.0.")
        return router_type


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "mixtral", "transformers.models.mixtral.modeling_mixtral", "MixtralPreTrainedModel", "MixtralTopKRouter",
        "gate", "softmax, top-k, gates renormalised over the selected experts",
        weights_model_dtype=False,
    ),
    Architecture(
        "olmoe", "transformers.models.olmoe.modeling_olmoe", "OlmoePreTrainedModel", "OlmoeTopKRouter",
        "gate", "softmax, top-k, gates renormalised iff norm_topk_prob",
    ),
    Architecture(
        "qwen2_moe", "transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoePreTrainedModel",
        "Qwen2MoeTopKRouter", "gate", "softmax, top-k, gates renormalised iff norm_topk_prob",
    ),
    Architecture(
        "qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoePreTrainedModel",
        "Qwen3MoeTopKRouter", "gate", "softmax, top-k, gates renormalised iff norm_topk_prob",
    ),
    Architecture(
        "deepseek_v3", "transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3PreTrainedModel",
        "DeepseekV3TopkRouter", "gate",
        "sigmoid, selection bias, group-limited top-k (group score = sum of its top-2), "
        "gates renormalised iff norm_topk_prob, times routed_scaling_factor",
        logits_fp32=True, weights_model_dtype=False,
    ),
    Architecture(
        "gpt_oss", "transformers.models.gpt_oss.modeling_gpt_oss", "GptOssPreTrainedModel", "GptOssTopKRouter",
        "router", "linear with bias, top-k of the logits, softmax over the k selected logits",
    ),
)


def supported_architectures() -> list[str]:
    """Names of the supported architectures."""
    return [arch.name for arch in ARCHITECTURES]


def architecture_of(model: nn.Module) -> Architecture:
    """The architecture of a transformers ``model`` (any head: causal LM, base model, classifier).

    Raises:
        ConfigError: the model is not one of the supported classes (the message lists them).
    """
    for arch in ARCHITECTURES:
        base = arch.load(arch.pretrained_class)
        if base is not None and isinstance(model, base):
            return arch
    supported = ", ".join(f"{a.name} ({a.pretrained_class})" for a in ARCHITECTURES)
    raise ConfigError(
        f"model of class {type(model).__name__} is not a supported MoE architecture. "
        f"routelab.models.hf supports: {supported}. Pass one of these transformers models "
        "(e.g. loaded with AutoModelForCausalLM.from_pretrained)."
    )
