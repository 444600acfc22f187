"""Routers: the generic pipeline (``parts``), one module per paper family (``families``) and the registry."""

from routelab.routers import families as _families  # noqa: F401  (registers the presets)
from routelab.routers.parts.router import Router, RoutingDraft, end_of_step, fit_to_data, register_end_of_step
from routelab.routers.registry import CommonOptions, create_router, list_routers, preset_info, register_preset

__all__ = [
    "CommonOptions",
    "Router",
    "RoutingDraft",
    "create_router",
    "end_of_step",
    "fit_to_data",
    "list_routers",
    "preset_info",
    "register_end_of_step",
    "register_preset",
]
