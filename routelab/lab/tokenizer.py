"""A byte-level BPE tokenizer (GPT-2 style, Radford et al. 2019) trained with HF ``tokenizers``.

Byte-level pre-tokenisation maps every byte to a printable symbol before BPE merges, so any
text, in any script, encodes without unknown tokens and decodes back exactly. Documents are
separated by the special token ``<|endoftext|>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_positive_int

END_OF_TEXT = "<|endoftext|>"
MIN_VOCAB_SIZE = 256 + 1  # every byte, plus the end-of-text token


class TextTokenizer:
    """A trained byte-level BPE tokenizer.

    Attributes:
        vocab_size: number of token ids (ids are ``0 .. vocab_size - 1``).
        eot_id: id of ``<|endoftext|>``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        if tokenizer.token_to_id(END_OF_TEXT) is None:
            raise ConfigError(f"the tokenizer has no {END_OF_TEXT!r} token; train it with routelab.lab.tokenizer.")
        self.tokenizer = tokenizer
        # text that spells "<|endoftext|>" is ordinary text; only eot_id ends a document
        self.tokenizer.encode_special_tokens = True
        self.eot_id = int(tokenizer.token_to_id(END_OF_TEXT))
        self.vocab_size = int(tokenizer.get_vocab_size())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> TextTokenizer:
        """Learn ``vocab_size`` tokens (256 bytes, the end-of-text token, then merges) from ``texts``."""
        check_positive_int("vocab_size", vocab_size, minimum=MIN_VOCAB_SIZE)
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(text))

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"tokenizer file {str(path)!r} does not exist.")
        return cls(Tokenizer.from_file(str(path)))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def content_hash(self) -> str:
        """SHA-256 of the serialised tokenizer (names it in checkpoints and traces)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (the end-of-text token decodes to nothing)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_strings(self, ids: Iterable[int]) -> Iterator[str]:
        """The text of each token on its own (bytes that split a character show as U+FFFD)."""
        for token_id in ids:
            yield self.tokenizer.decode([int(token_id)], skip_special_tokens=False)
