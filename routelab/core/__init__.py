"""Core types: Routing, contexts, errors, validation, routing statistics and the shape-letter legend (``shapes``)."""

from routelab.core.context import RoutingContext, TokenBatch
from routelab.core.errors import ConfigError, InputError, RoutelabError, UnknownNameError
from routelab.core.routing import Routing

__all__ = ["ConfigError", "InputError", "Routing", "RoutelabError", "RoutingContext", "TokenBatch", "UnknownNameError"]
