"""Importing this package registers every preset (one module per family), in list order."""

from routelab.routers.families import standard  # noqa: F401  (switch, gshard, mixtral, topk, noisy-topk)
from routelab.routers.families import deepseek  # noqa: F401  (deepseek-v3, loss-free)
from routelab.routers.families import expert_choice  # noqa: F401
from routelab.routers.families import fixed  # noqa: F401  (hash, random-fixed)
from routelab.routers.families import dynamic, recurrent, graph, coupling, reuse, sparsity, entropy, prototypes, soft  # noqa: F401,E401  (dynamic-k, recurrent, graph, coupling, reuse, sparsity-aware, entropy, prototype, soft)
from routelab.routers.families import transport  # noqa: F401  (base, sinkhorn, ssr)
from routelab.routers.families import ec_dlm  # noqa: F401  (ec-dlm)
from routelab.routers.families import balancing  # noqa: F401  (bip)
from routelab.routers.families import geometry  # noqa: F401  (cosine, sra, kmeans)
from routelab.routers.families import relu  # noqa: F401  (remoe, blockffn)
