"""The built-in query routers; importing this package registers them (see ``list_query_routers``)."""

from routelab.queries.routers import bandits, baselines, cascade, elo, mf, predictors  # noqa: F401
