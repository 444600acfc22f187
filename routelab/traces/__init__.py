"""Routing traces: one columnar format for the routing of every token at every MoE layer.

``TraceWriter`` streams a trace to disk, ``Trace`` reads it (``routelab.Trace``), and
``TraceRecorder`` records one from a model through a ``RoutingSource``. The layout is
documented in ``routelab.traces.format`` and docs/traces.md.
"""

from routelab.traces.format import FORMAT_NAME, FORMAT_VERSION
from routelab.traces.memory import InMemoryTrace, TraceLike
from routelab.traces.reader import LayerRouting, TokenTable, Trace, TraceChunk, sequence_offsets
from routelab.traces.recorder import LayerRoutes, ModuleRoutingSource, RoutingSource, TraceRecorder, moe_layers
from routelab.traces.writer import TraceWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "InMemoryTrace",
    "LayerRouting",
    "LayerRoutes",
    "ModuleRoutingSource",
    "RoutingSource",
    "TokenTable",
    "Trace",
    "TraceChunk",
    "TraceLike",
    "TraceRecorder",
    "TraceWriter",
    "moe_layers",
    "sequence_offsets",
]
