"""The built-in query routers; importing this package registers them (see ``list_query_routers``)."""

# Registration order is the order ``routelab queries list`` shows: baselines first.
from routelab.queries.routers import baselines  # noqa: F401, I001
from routelab.queries.routers import predictors, mf, elo, cascade, bandits  # noqa: F401, I001
