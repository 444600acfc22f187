"""Prepared corpora: a tokenizer and token arrays on disk, cached by content hash.

``prepare_corpus`` collects the documents (``routelab.lab.corpus``), hashes their names
and texts together with the preparation options, and looks for
``<cache>/<label>-<hash>/``. On a miss it trains the tokenizer on the training split,
encodes both splits (documents joined by ``<|endoftext|>``) and writes, atomically:

* ``tokenizer.json``;
* ``{train,val}.tokens``: numpy memmaps of token ids (uint16 when the vocabulary fits, else uint32);
* ``{train,val}.domains``: uint8 memmaps, the domain index of every token;
* ``meta.json``: domains, sizes, options and the content hash.

Any change to a selected document's text or name, or to the options, changes the hash and
rebuilds. The cache root is ``$ROUTELAB_CACHE`` or ``.cache/routelab`` in the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.core.json_files import read_json
from routelab.core.validation import check_positive_int
from routelab.lab.corpus import DEFAULT_CORPUS, Document, collect_documents, split_documents
from routelab.lab.tokenizer import MIN_VOCAB_SIZE, TextTokenizer

PREP_VERSION = 1
SPLITS = ("train", "val")
CACHE_ENV = "ROUTELAB_CACHE"


def default_cache_dir() -> Path:
    """``$ROUTELAB_CACHE`` if set, else ``.cache/routelab`` under the current directory."""
    return Path(os.environ.get(CACHE_ENV) or Path.cwd() / ".cache" / "routelab")


@dataclass(frozen=True)
class CorpusOptions:
    """How to build a prepared corpus.

    Attributes:
        source: ``default`` (drama + Python code) or a path to a folder / one text file.
        max_bytes_per_domain: cap on the UTF-8 bytes taken from each domain (None = all).
        val_fraction: share of documents (by name hash) held out for validation.
        vocab_size: byte-level BPE vocabulary size.
        chunk_bytes: files larger than this are cut into documents of this size.
    """

    source: str = DEFAULT_CORPUS
    max_bytes_per_domain: int | None = 2_000_000
    val_fraction: float = 0.1
    vocab_size: int = 8192
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        check_positive_int("vocab_size", self.vocab_size, minimum=MIN_VOCAB_SIZE)
        if self.vocab_size > 2**32:
            raise ConfigError(f"vocab_size={self.vocab_size} does not fit in uint32 token arrays.")

    def resolved_source(self) -> str:
        return self.source if self.source == DEFAULT_CORPUS else str(Path(self.source).resolve())


def content_hash(splits: dict[str, list[Document]], options: CorpusOptions) -> str:
    """SHA-256 over the preparation version, the options and every document's split, domain, name and text."""
    digest = hashlib.sha256()
    settings = {**asdict(options), "source": None, "version": PREP_VERSION}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for split in SPLITS:
        for doc in splits[split]:
            for part in (split, doc.domain, doc.name, hashlib.sha256(doc.text.encode("utf-8")).hexdigest()):
                digest.update(part.encode("utf-8"))
                digest.update(b"\x00")
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class PreparedCorpus:
    """A prepared corpus on disk: tokenizer, token and domain arrays of both splits.

    Attributes:
        path: its cache folder.
        meta: the ``meta.json`` content (domains, counts, options, hash).
        tokenizer: the trained ``TextTokenizer``.
        domains: domain names; ``domains[i]`` is label ``i`` in the domain arrays.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise InputError(f"{str(self.path)!r} is not a prepared corpus (no meta.json); run prepare_corpus first.")
        self.meta: dict[str, Any] = read_json(meta_file, "prepared-corpus metadata")
        self.tokenizer = TextTokenizer.load(self.path / "tokenizer.json")
        self.domains: list[str] = list(self.meta["domains"])
        self._dtype = np.dtype(self.meta["token_dtype"])

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def tokens(self, split: str) -> np.memmap:
        """Token ids of ``split`` (read-only memmap)."""
        return self._array(split, "tokens", self._dtype)

    def domain_labels(self, split: str) -> np.memmap:
        """Domain index of every token of ``split`` (read-only uint8 memmap)."""
        return self._array(split, "domains", np.dtype(np.uint8))

    def _array(self, split: str, kind: str, dtype: np.dtype) -> np.memmap:
        if split not in SPLITS:
            raise ConfigError(f"split={split!r} must be one of {SPLITS}.")
        return np.memmap(self.path / f"{split}.{kind}", dtype=dtype, mode="r", shape=(self.meta["num_tokens"][split],))

    def describe(self) -> dict[str, Any]:
        """What checkpoints and reports record about the corpus."""
        keys = ("source", "content_hash", "domains", "num_tokens", "num_documents", "num_bytes", "options")
        return {k: self.meta[k] for k in keys}


def encode_split(
    documents: list[Document], tokenizer: TextTokenizer, domains: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``documents`` joined by end-of-text, and the domain label of each token."""
    ids = tokenizer.encode_batch([d.text for d in documents])
    dtype = token_dtype(tokenizer.vocab_size)
    lengths = [len(x) + 1 for x in ids]
    tokens = np.empty(sum(lengths), dtype=dtype)
    labels = np.empty(sum(lengths), dtype=np.uint8)
    offset = 0
    for doc, doc_ids, length in zip(documents, ids, lengths):
        tokens[offset : offset + length - 1] = doc_ids
        tokens[offset + length - 1] = tokenizer.eot_id
        labels[offset : offset + length] = domains.index(doc.domain)
        offset += length
    return tokens, labels


def build_prepared(
    target: Path, splits: dict[str, list[Document]], options: CorpusOptions, digest: str, skipped: dict[str, int]
) -> None:
    """Train the tokenizer, encode and write everything into a temp folder, then rename it to ``target``."""
    domains = sorted({d.domain for docs in splits.values() for d in docs})
    if len(domains) > 255:
        raise InputError(f"the corpus has {len(domains)} domains; at most 255 are supported.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = TextTokenizer.train((d.text for d in splits["train"]), options.vocab_size)
        tokenizer.save(tmp / "tokenizer.json")
        num_tokens = {}
        for split, docs in splits.items():
            tokens, labels = encode_split(docs, tokenizer, domains)
            tokens.tofile(tmp / f"{split}.tokens")
            labels.tofile(tmp / f"{split}.domains")
            num_tokens[split] = int(tokens.size)
        meta = {
            "version": PREP_VERSION,
            "source": options.resolved_source(),
            "content_hash": digest,
            "domains": domains,
            "token_dtype": token_dtype(tokenizer.vocab_size).name,
            "num_tokens": num_tokens,
            "num_documents": {s: len(d) for s, d in splits.items()},
            "num_bytes": {s: sum(doc.num_bytes for doc in d) for s, d in splits.items()},
            "val_documents": [d.name for d in splits["val"]],
            "skipped_files": skipped,
            "tokenizer_hash": tokenizer.content_hash(),
            "options": asdict(options),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if target.exists() and not (target / "meta.json").is_file():
            shutil.rmtree(target)  # the remains of a build that was interrupted by hand
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "meta.json").is_file():  # not a concurrent identical build: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def corpus_label(options: CorpusOptions) -> str:
    if options.source == DEFAULT_CORPUS:
        return DEFAULT_CORPUS
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(options.source).name)
    return name or "corpus"


def prepare_corpus(options: CorpusOptions | None = None, cache_dir: str | Path | None = None) -> PreparedCorpus:
    """Collect, split, tokenize and cache a corpus; reuse the cache when nothing changed."""
    options = options or CorpusOptions()
    documents, skipped = collect_documents(
        options.source, max_bytes_per_domain=options.max_bytes_per_domain, chunk_bytes=options.chunk_bytes
    )
    splits = split_documents(documents, options.val_fraction)
    digest = content_hash(splits, options)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{corpus_label(options)}-{digest[:16]}"
    if not (target / "meta.json").is_file():
        build_prepared(target, splits, options, digest, skipped)
    return PreparedCorpus(target)
