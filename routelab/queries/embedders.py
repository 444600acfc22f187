"""Query featurisers. Default: TF-IDF + truncated SVD from scikit-learn, fitted on the training
split only: local, deterministic, no download and no network call, at import or at run time.

An embedder is anything with ``fit(dataset) -> self`` and ``transform(dataset) -> X_QD``
(float32, rows L2-normalised). Built in: ``TfidfSvdEmbedder`` (default),
``CallableEmbedder`` (wrap a function of a list of prompts), ``PrecomputedEmbedder``
(vectors by query id) and ``SentenceTransformerEmbedder`` (a sentence-transformers model
from a *local folder*, loaded with ``local_files_only``; never fetched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.queries.dataset import QueryDataset


class Embedder(Protocol):
    def fit(self, dataset: QueryDataset) -> Embedder: ...

    def transform(self, dataset: QueryDataset) -> np.ndarray: ...


def l2_normalise(x: np.ndarray, where: str = "embedding") -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"{where} must be a 2-D array [queries, dims], got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise InputError(f"{where} holds NaN or Inf values.")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class TfidfSvdEmbedder:
    """Word n-gram TF-IDF (sublinear tf, words seen in >= 2 training prompts) -> truncated SVD
    (latent semantic analysis, Deerwester et al. 1990) -> L2 norm. Default unigrams, 128 dims."""

    def __init__(self, dim: int = 128, max_features: int = 20_000, ngram_max: int = 1, seed: int = 0) -> None:
        if dim < 1 or max_features < 1 or ngram_max < 1:
            raise ConfigError(f"TfidfSvdEmbedder needs dim, max_features and ngram_max >= 1, got {dim}, {max_features}, "
                              f"{ngram_max}.")
        self.dim, self.max_features, self.ngram_max, self.seed = dim, max_features, ngram_max, seed
        self._vectorizer = None
        self._svd = None

    def fit(self, dataset: QueryDataset) -> TfidfSvdEmbedder:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not any(p.strip() for p in dataset.prompts):
            raise InputError(f"dataset {dataset.name!r} has no prompt text to fit the TF-IDF embedder on; "
                             "give a prompt column or precomputed vectors (PrecomputedEmbedder).")
        from routelab.queries.base import single_thread

        self._vectorizer = TfidfVectorizer(ngram_range=(1, self.ngram_max), sublinear_tf=True, min_df=2, max_features=self.max_features,
                                           dtype=np.float32)
        tfidf = self._vectorizer.fit_transform(dataset.prompts)
        components = max(1, min(self.dim, tfidf.shape[1] - 1, tfidf.shape[0] - 1))
        self._svd = TruncatedSVD(n_components=components, random_state=self.seed, algorithm="randomized", n_iter=5)
        with single_thread():
            self._svd.fit(tfidf)
        return self

    def transform(self, dataset: QueryDataset) -> np.ndarray:
        if self._svd is None:
            raise ConfigError("TfidfSvdEmbedder.transform called before fit (fit it on the training split).")
        return l2_normalise(self._svd.transform(self._vectorizer.transform(dataset.prompts)))


class CallableEmbedder:
    """Wrap ``fn(prompts: list[str]) -> array [len(prompts), D]`` (nothing to fit)."""

    def __init__(self, fn: Callable[[list[str]], np.ndarray]) -> None:
        if not callable(fn):
            raise ConfigError("CallableEmbedder needs a callable of a list of prompts.")
        self.fn = fn

    def fit(self, dataset: QueryDataset) -> CallableEmbedder:
        return self

    def transform(self, dataset: QueryDataset) -> np.ndarray:
        x = l2_normalise(self.fn(list(dataset.prompts)), "the embedding function's output")
        if x.shape[0] != dataset.num_queries:
            raise InputError(f"the embedding function returned {x.shape[0]} rows for {dataset.num_queries} prompts.")
        return x


class PrecomputedEmbedder:
    """Vectors looked up by query id (e.g. embeddings computed elsewhere, once)."""

    def __init__(self, vectors: Mapping[str, Sequence[float]]) -> None:
        self.vectors = vectors

    def fit(self, dataset: QueryDataset) -> PrecomputedEmbedder:
        return self

    def transform(self, dataset: QueryDataset) -> np.ndarray:
        missing = [q for q in dataset.query_ids if q not in self.vectors]
        if missing:
            raise InputError(f"no precomputed vector for {len(missing)} queries, e.g. {missing[:3]}.")
        return l2_normalise(np.stack([np.asarray(self.vectors[q], dtype=np.float32) for q in dataset.query_ids]))


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local folder only (``local_files_only=True``)."""

    def __init__(self, path: str | Path, batch_size: int = 64) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self._model = None

    def fit(self, dataset: QueryDataset) -> SentenceTransformerEmbedder:
        if not self.path.is_dir():
            raise ConfigError(f"sentence-transformers model folder {str(self.path)!r} does not exist; it is never "
                              "downloaded: give the path of a model saved on this machine.")
        try:
            from sentence_transformers import SentenceTransformer
        except ModuleNotFoundError:
            raise ConfigError("SentenceTransformerEmbedder needs `pip install sentence-transformers`.") from None
        self._model = SentenceTransformer(str(self.path), local_files_only=True)
        return self

    def transform(self, dataset: QueryDataset) -> np.ndarray:
        if self._model is None:
            raise ConfigError("SentenceTransformerEmbedder.transform called before fit.")
        return l2_normalise(self._model.encode(list(dataset.prompts), batch_size=self.batch_size))
