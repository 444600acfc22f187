"""One module per paper family: its own router parts and its registered presets.

Importing this package registers every preset; the import order is the order of
``routelab list``.
"""

from routelab.routers.families import standard  # noqa: F401  (switch, gshard, mixtral, topk, noisy-topk)
from routelab.routers.families import deepseek  # noqa: F401  (deepseek-v3, loss-free)
from routelab.routers.families import expert_choice  # noqa: F401  (expert-choice)
from routelab.routers.families import fixed  # noqa: F401  (hash, random-fixed)
from routelab.routers.families import dynamic  # noqa: F401  (top-p, dynamoe)
from routelab.routers.families import recurrent  # noqa: F401  (rmoe)
from routelab.routers.families import graph  # noqa: F401  (similarity-aware, attention-aware)
from routelab.routers.families import coupling  # noqa: F401  (erc)
from routelab.routers.families import reuse  # noqa: F401  (rexmoe, condenser)
from routelab.routers.families import sparsity  # noqa: F401  (moe-x)
from routelab.routers.families import entropy  # noqa: F401  (dynmole, magnet)
from routelab.routers.families import prototypes  # noqa: F401  (promoe)
from routelab.routers.families import soft  # noqa: F401  (soft-moe)
from routelab.routers.families import transport  # noqa: F401  (base, sinkhorn, ssr)
from routelab.routers.families import ec_dlm  # noqa: F401  (ec-dlm)
from routelab.routers.families import balancing  # noqa: F401  (bip)
from routelab.routers.families import geometry  # noqa: F401  (cosine, sra, kmeans)
from routelab.routers.families import relu  # noqa: F401  (remoe, blockffn)
