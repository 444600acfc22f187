"""``routelab.hf``: short name for ``routelab.models.hf`` (routing inside transformers MoE models)."""

from routelab.models.hf import *  # noqa: F401,F403
from routelab.models.hf import __all__  # noqa: F401
