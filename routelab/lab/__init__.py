"""The lab: corpora and tokenizer, TinyLM training with exact resume, router comparisons
and their reports.

Entry points: ``prepare_corpus`` (``routelab.lab.data``), ``train_run``
(``routelab.lab.train``), ``load_experiment`` / ``run_experiment``
(``routelab.lab.experiment``) and ``load_model`` (``routelab.lab.checkpoint``).
"""

from routelab.lab.checkpoint import load_model

__all__ = ["load_model"]
