"""Tiny random transformers MoE models of the six supported architectures, built offline.

Each has 2 decoder layers (both MoE), hidden size 16, 4-8 experts, top-2, fp32. Weights
are drawn from a fixed seed, so two calls give the same model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ARCH_NAMES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")
VOCAB = 96

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_config(name: str, **overrides):
    import transformers as tf

    if name == "mixtral":
        config = tf.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    elif name == "olmoe":
        config = tf.OlmoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2)
    elif name == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
        )
    elif name == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8)
    elif name == "deepseek_v3":
        common = {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}
        config = tf.DeepseekV3Config(
            **common, num_key_value_heads=2, moe_intermediate_size=16, n_routed_experts=8, n_group=2, topk_group=1,
            num_experts_per_tok=2, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, n_shared_experts=1, rope_scaling=None,
        )
    elif name == "gpt_oss":
        config = tf.GptOssConfig(
            **_COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        )
    else:
        raise ValueError(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(name: str, seed: int = 0, **overrides):
    """A tiny causal LM of architecture ``name`` in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(name, **overrides)
    model = tf.AutoModelForCausalLM.from_config(config)
    if name == "deepseek_v3":  # a non-zero selection bias, so that copying it is tested
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()


def tiny_batch(batch: int = 2, seq: int = 9, seed: int = 1, padded: bool = False):
    """``input_ids`` and ``attention_mask`` (left padding on the second row when ``padded``)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
        input_ids[1, :3] = 0
    return input_ids, mask


class KeepCalls:
    """A router observer that keeps every ``RouterCall`` it receives, in order."""

    def __init__(self):
        self.calls = []

    def on_router_call(self, call):
        self.calls.append(call)
