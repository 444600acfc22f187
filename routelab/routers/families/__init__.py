"""Importing this package registers every preset (one module per family), in list order."""

from routelab.routers.presets import standard  # noqa: F401  (switch, gshard, mixtral, topk, noisy-topk)
from routelab.routers.presets import deepseek  # noqa: F401  (deepseek-v3, loss-free)
from routelab.routers.presets import expert_choice  # noqa: F401
from routelab.routers.presets import fixed  # noqa: F401  (hash, random-fixed)
from routelab.routers.presets import dynamic, recurrent, graph, coupling, reuse, sparsity, entropy, prototypes, soft  # noqa: F401,E401  (dynamic-k, recurrent, graph, coupling, reuse, sparsity-aware, entropy, prototype, soft)
from routelab.routers.presets import transport  # noqa: F401  (base, sinkhorn, ssr)
from routelab.routers.presets import ec_dlm  # noqa: F401  (ec-dlm)
from routelab.routers.presets import balancing  # noqa: F401  (bip)
from routelab.routers.presets import geometry  # noqa: F401  (cosine, sra, kmeans)
from routelab.routers.presets import relu  # noqa: F401  (remoe, blockffn)
