"""Attach routelab to a pretrained transformers MoE model without rewriting it.

``attach(model)`` recognises the architecture, finds its MoE layers and returns a
``RoutingHandle`` that

* observes every router call (real tokens only, during any forward or ``generate``):
  the per-layer load (``routing_stats``) and any observer such as a trace recorder;
* replaces the router of chosen layers by a routelab router (``replace_router``),
  keeping ``output_router_logits`` and the model's own aux loss working;
* detaches cleanly: the original router modules come back (same objects), no hook of
  ours is left behind and the model computes exactly what it computed before.

Nothing of the model is changed at attach time: observation uses forward hooks, and
replacement routers own copies of the pretrained weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from routelab.core.errors import ConfigError
from routelab.routers.parts.router import Router
from routelab.models.hf.context import ForwardLayout, SequenceCounter, forward_tokens_from_call
from routelab.models.hf.observe import LoadCounter, RouterCall, RouterObserver
from routelab.models.hf.registry import Architecture, architecture_of
from routelab.models.hf.routers import (
    EquivalentPreset,
    ForwardState,
    PretrainedInit,
    ReplacementRouter,
    equivalent_preset,
    make_replacement,
    native_router,
    preset_router,
)

NATIVE = "native"
_HANDLE_ATTR = "_routelab_handle"


@dataclass
class MoELayer:
    """One MoE layer of the model.

    Attributes:
        index: position among the MoE layers (the layer id of traces).
        model_layer: index of the decoder layer.
        block: the MoE block (``layer.mlp``) whose router attribute is swapped.
        original: the model's own router module.
    """

    index: int
    model_layer: int
    block: nn.Module
    original: nn.Module


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a checkpointed forward being recomputed):
    such router calls are not observed again."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no decoder layer list at base_model.layers; cannot attach.")
    return layers


class RoutingHandle:
    """The handle returned by ``attach``; see the module docstring.

    Layers are named by their decoder-layer index (``model.model.layers[i]``) in every
    method; ``moe_layers`` lists the ones that hold an MoE block.
    """

    def __init__(self, model: nn.Module, *, track_load: bool = True) -> None:
        self.model = model
        self.architecture: Architecture = architecture_of(model)
        if getattr(model, _HANDLE_ATTR, None) is not None:
            raise ConfigError("this model already has routelab attached; call handle.detach() first.")
        router_type = self.architecture.router_type()
        self._layers: list[MoELayer] = []
        for model_layer, layer in enumerate(_decoder_layers(model)):
            block = getattr(layer, "mlp", None)
            router = getattr(block, self.architecture.router_attr, None) if block is not None else None
            if isinstance(router, router_type):
                self._layers.append(MoELayer(len(self._layers), model_layer, block, router))
        if not self._layers:
            raise ConfigError(f"{type(model).__name__} has no MoE layer with a {router_type.__name__}; nothing to attach to.")
        first = self._layers[0].original
        self.num_experts = int(first.num_experts)
        self.top_k = int(first.top_k)
        self.hidden_size = int(first.hidden_dim)
        self._by_model_layer = {layer.model_layer: layer for layer in self._layers}
        self._state = ForwardState()
        self._counter = SequenceCounter()
        self._observers: list[RouterObserver] = []
        self._pending: list[tuple[MoELayer, Any, Any]] = []
        self._in_forward = False
        self._router_hooks: dict[int, RemovableHandle] = {}
        self._copied_hooks: dict[int, set[int]] = {}
        self._auto_native: set[int] = set()  # layers given the native router by ensure_routelab
        self._load = LoadCounter(len(self._layers), self.num_experts) if track_load else None
        if self._load is not None:
            self._observers.append(self._load)
        base = getattr(model, "base_model", model)
        self._base = base
        self._layout = ForwardLayout.of(base.forward)  # refuses a forward whose arguments it cannot read
        self._model_hooks = [
            base.register_forward_pre_hook(self._on_forward_start, with_kwargs=True),
            base.register_forward_hook(self._on_forward_end),
        ]
        for layer in self._layers:
            self._hook_router(layer, layer.original)
        setattr(model, _HANDLE_ATTR, self)
        self._attached = True

    # ------------------------------------------------------------------ layout

    @property
    def moe_layers(self) -> list[int]:
        """Decoder-layer indices of the MoE layers, in order."""
        return [layer.model_layer for layer in self._layers]

    @property
    def num_moe_layers(self) -> int:
        return len(self._layers)

    def layer(self, model_layer: int) -> MoELayer:
        """The MoE layer at decoder layer ``model_layer`` (clear error if it has none)."""
        if model_layer not in self._by_model_layer:
            raise ConfigError(
                f"layer {model_layer} is not an MoE layer of this model; MoE layers: {self.moe_layers}."
            )
        return self._by_model_layer[model_layer]

    def resolve_layers(self, layers: int | list[int] | tuple[int, ...] | None) -> list[int]:
        """Decoder-layer indices of ``layers`` (None = all MoE layers; negative counts from the end)."""
        if layers is None:
            return self.moe_layers
        if isinstance(layers, int):
            layers = [layers]
        resolved = []
        count = len(_decoder_layers(self.model))
        for layer in layers:
            index = layer + count if layer < 0 else layer
            self.layer(index)
            if index not in resolved:
                resolved.append(index)
        return resolved

    def current_router(self, model_layer: int) -> nn.Module:
        """The router module now in place at ``model_layer`` (original or replacement)."""
        layer = self.layer(model_layer)
        return getattr(layer.block, self.architecture.router_attr)

    def routelab_router(self, model_layer: int) -> Router | None:
        """The routelab ``Router`` replacing the router of ``model_layer`` (None if the original is in place)."""
        module = self.current_router(model_layer)
        return module.routelab_router if isinstance(module, ReplacementRouter) else None

    # ------------------------------------------------------------------ observation

    def add_observer(self, observer: RouterObserver) -> RouterObserver:
        """Call ``observer.on_router_call`` for every router call from now on."""
        self._check_attached()
        self._observers.append(observer)
        return observer

    def remove_observer(self, observer: RouterObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def routing_stats(self, *, reset: bool = False) -> dict[str, dict[str, float | list[float]]]:
        """Load and balance of the routing seen since attach (or the last reset), per layer and overall.

        Keys are ``"layer_<i>"`` (i = MoE layer index, as in traces) and ``"all"``; values
        hold ``load``, ``max_vio``, ``cv``, ``entropy``, ``dead_experts``, ``num_tokens``.
        """
        if self._load is None:
            raise ConfigError("attach(model, track_load=False) does not count loads; attach with track_load=True.")
        stats = self._load.stats()
        if reset:
            self._load.reset()
        return stats

    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._state.tokens = forward_tokens_from_call(self._layout, args, kwargs, self._counter)
        self._pending = []
        self._in_forward = True
        for layer in self._layers:
            current = getattr(layer.block, self.architecture.router_attr)
            if isinstance(current, ReplacementRouter):
                current.last_routing = None

    def _on_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Observers see the router calls of a forward when it ends, outside the decoder layers,
        so that what they compute is not part of an activation-checkpointed region. The token
        layout stays set: checkpointing re-runs the routers in backward."""
        pending, self._pending, self._in_forward = self._pending, [], False
        for layer, routing, output_ in pending:
            self._emit(layer, routing, output_)

    def _hook_router(self, layer: MoELayer, module: nn.Module) -> None:
        def hook(router: nn.Module, args: tuple, output: Any) -> None:
            if not self._observers or _in_backward():  # a checkpointed forward being recomputed
                return
            routing = router.last_routing if isinstance(router, ReplacementRouter) else None
            if self._in_forward:
                self._pending.append((layer, routing, output))
            else:  # a router called on its own
                self._emit(layer, routing, output)

        self._router_hooks[layer.index] = module.register_forward_hook(hook)

    def _emit(self, layer: MoELayer, routing: Any, output: Any) -> None:
        logits_UE, weight_UK, idx_UK = output[0], output[1], output[2]
        tokens = self._state.tokens_for(logits_UE.shape[0], logits_UE.device)
        if routing is not None:
            logits_TE, idx_TK, weight_TK = routing.logits, routing.topk_idx, routing.topk_weight
        else:
            logits_TE = tokens.real_rows(logits_UE)
            idx_TK = tokens.real_rows(idx_UK)
            weight_TK = tokens.real_rows(weight_UK)
        call = RouterCall(layer.index, layer.model_layer, logits_TE, idx_TK, weight_TK, tokens)
        for observer in list(self._observers):
            observer.on_router_call(call)

    # ------------------------------------------------------------------ replacement

    def equivalent_preset(self, model_layer: int | None = None) -> EquivalentPreset:
        """The registered preset that is this model's routing rule (and whether it is exact)."""
        layer = self._layers[0] if model_layer is None else self.layer(model_layer)
        return equivalent_preset(self.architecture, layer.original)

    def replace_router(
        self,
        preset: str = NATIVE,
        layers: int | list[int] | None = None,
        *,
        init_from_pretrained: bool = True,
        **options: Any,
    ) -> dict[int, PretrainedInit | None]:
        """Route ``layers`` (default all MoE layers) with a routelab router.

        Args:
            preset: ``"native"`` (the model's own rule in routelab parts, bit-identical in
                fp32) or any registered preset (``routelab list``).
            layers: decoder-layer indices.
            init_from_pretrained: start the preset's linear scorer (and a sigmoid loss-free
                bias) from the model's router weights.
            **options: preset options (``top_k`` included; it defaults to the model's).

        Returns:
            per layer, what was taken from the pretrained router (None for ``native``,
            which takes everything).
        """
        self._check_attached()
        result: dict[int, PretrainedInit | None] = {}
        for model_layer in self.resolve_layers(layers):
            layer = self.layer(model_layer)
            if preset == NATIVE:
                if options:
                    raise ConfigError(f"the native router takes no options, got {sorted(options)}.")
                router, init = native_router(self.architecture, layer.original), None
            else:
                router, init = preset_router(
                    preset, self.architecture, layer.original, init_from_pretrained=init_from_pretrained, **options
                )
            self._install(layer, router)
            self._auto_native.discard(model_layer)
            result[model_layer] = init
        return result

    def ensure_routelab(self, layers: int | list[int] | None = None) -> dict[int, Router]:
        """The routelab routers of ``layers``, installing the native rule where the original is in
        place (``release`` puts the original back once nothing uses it)."""
        routers: dict[int, Router] = {}
        for model_layer in self.resolve_layers(layers):
            router = self.routelab_router(model_layer)
            if router is None:
                self.replace_router(NATIVE, model_layer)
                self._auto_native.add(model_layer)
                router = self.routelab_router(model_layer)
            assert router is not None
            routers[model_layer] = router
        return routers

    def release(self, layers: int | list[int] | None = None) -> None:
        """Restore the original router of ``layers`` that ``ensure_routelab`` replaced, once no
        logit or selection offset (rerouting, steering) remains on them."""
        from routelab.models.hf.routers import has_offsets

        for model_layer in self.resolve_layers(layers):
            router = self.routelab_router(model_layer)
            if model_layer in self._auto_native and (router is None or not has_offsets(router)):
                self.restore_router(model_layer)

    def restore_router(self, layers: int | list[int] | None = None) -> None:
        """Put the model's own router back in ``layers`` (default all)."""
        for model_layer in self.resolve_layers(layers):
            layer = self.layer(model_layer)
            current = getattr(layer.block, self.architecture.router_attr)
            if current is layer.original:
                continue
            self._unhook(layer)
            self._copy_new_foreign_hooks(current, layer.original, self._copied_hooks.pop(layer.index, set()))
            setattr(layer.block, self.architecture.router_attr, layer.original)
            self._hook_router(layer, layer.original)
            self._auto_native.discard(model_layer)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the routelab aux losses of the replaced routers in the latest forward (0 if none)."""
        total = torch.zeros(())
        for layer in self._layers:
            current = getattr(layer.block, self.architecture.router_attr)
            routing = getattr(current, "last_routing", None)
            if routing is not None and routing.aux_loss is not None:
                total = total.to(routing.aux_loss.device) + routing.aux_loss
        return total

    def _install(self, layer: MoELayer, router: Router) -> None:
        current = getattr(layer.block, self.architecture.router_attr)
        if current is not layer.original:
            self.restore_router(layer.model_layer)
        replacement = make_replacement(layer.original, router, self.architecture, self._state)
        self._unhook(layer)
        self._copied_hooks[layer.index] = self._copy_foreign_hooks(layer.original, replacement)
        setattr(layer.block, self.architecture.router_attr, replacement)
        self._hook_router(layer, replacement)

    def _unhook(self, layer: MoELayer) -> None:
        handle = self._router_hooks.pop(layer.index, None)
        if handle is not None:
            handle.remove()

    @staticmethod
    def _copy_foreign_hooks(source: nn.Module, target: nn.Module) -> set[int]:
        """Give ``target`` the forward hooks others (transformers' output capture) put on ``source``."""
        copied: set[int] = set()
        for hook_id, hook in source._forward_hooks.items():
            handle = target.register_forward_hook(
                hook,
                with_kwargs=hook_id in source._forward_hooks_with_kwargs,
                always_call=hook_id in source._forward_hooks_always_called,
            )
            copied.add(handle.id)
        for hook_id, hook in source._forward_pre_hooks.items():
            handle = target.register_forward_pre_hook(hook, with_kwargs=hook_id in source._forward_pre_hooks_with_kwargs)
            copied.add(handle.id)
        return copied

    @staticmethod
    def _copy_new_foreign_hooks(source: nn.Module, target: nn.Module, already: set[int]) -> None:
        """Hooks installed on a replacement while it was in place (e.g. transformers installs its
        output-capture hooks at the first ``output_router_logits`` call) go to the original."""
        for hook_id, hook in source._forward_hooks.items():
            if hook_id not in already:
                target.register_forward_hook(
                    hook,
                    with_kwargs=hook_id in source._forward_hooks_with_kwargs,
                    always_call=hook_id in source._forward_hooks_always_called,
                )
        for hook_id, hook in source._forward_pre_hooks.items():
            if hook_id not in already:
                target.register_forward_pre_hook(hook, with_kwargs=hook_id in source._forward_pre_hooks_with_kwargs)

    # ------------------------------------------------------------------ detach

    @property
    def attached(self) -> bool:
        return self._attached

    def _check_attached(self) -> None:
        if not self._attached:
            raise ConfigError("this handle was detached; call attach(model) again.")

    def detach(self) -> None:
        """Restore every original router, remove every hook of ours; idempotent."""
        if not self._attached:
            return
        self.restore_router()
        for layer in self._layers:
            self._unhook(layer)
        for hook in self._model_hooks:
            hook.remove()
        self._model_hooks = []
        self._observers = []
        self._state.tokens = None
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self._attached = False

    def __enter__(self) -> RoutingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        replaced = [m for m in self.moe_layers if self.routelab_router(m) is not None] if self._attached else []
        return (
            f"RoutingHandle(architecture={self.architecture.name!r}, moe_layers={self.moe_layers}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, replaced={replaced}, attached={self._attached})"
        )


def attach(model: nn.Module, *, track_load: bool = True) -> RoutingHandle:
    """Attach routelab to a transformers MoE ``model`` (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE,
    DeepSeek-V3, GPT-OSS); see ``RoutingHandle``. Use as a context manager to detach on exit."""
    return RoutingHandle(model, track_load=track_load)
