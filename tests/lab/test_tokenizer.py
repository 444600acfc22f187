"""The byte-level BPE tokenizer: exact round trips on any text, stable serialisation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.lab_helpers import WORDS

from routelab.core.errors import ConfigError
from routelab.lab.tokenizer import END_OF_TEXT, TextTokenizer

TRAIN_TEXT = [" ".join(WORDS[i:] + WORDS[:i]) + "\n" for i in range(len(WORDS))] + ["def f(x):\n    return x\n"] * 5


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(TRAIN_TEXT, vocab_size=300)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_fixed_cases(tokenizer):
    for text in ["", " leading space", "tabs\tand\nnewlines\r\n", "ünïcödé ✓ 漢字 🙂", "the king and the queen"]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text


def test_merges_are_learned_and_eot_is_special(tokenizer):
    assert 257 < tokenizer.vocab_size <= 300
    assert len(tokenizer.encode("the king")) < len("the king".encode())
    assert tokenizer.eot_id == tokenizer.tokenizer.token_to_id(END_OF_TEXT)
    assert tokenizer.decode(tokenizer.encode("a") + [tokenizer.eot_id] + tokenizer.encode("b")) == "ab"
    assert tokenizer.eot_id not in tokenizer.encode(END_OF_TEXT)


def test_serialisation_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok.json")
    loaded = TextTokenizer.load(tmp_path / "tok.json")
    again = TextTokenizer.from_json(tokenizer.to_json())
    text = "the ghost of the king speaks"
    assert loaded.encode(text) == again.encode(text) == tokenizer.encode(text)
    assert loaded.content_hash() == tokenizer.content_hash()


def test_training_is_deterministic():
    a = TextTokenizer.train(TRAIN_TEXT, vocab_size=290)
    b = TextTokenizer.train(TRAIN_TEXT, vocab_size=290)
    assert a.to_json() == b.to_json()


def test_vocab_too_small():
    with pytest.raises(ConfigError, match="vocab_size"):
        TextTokenizer.train(TRAIN_TEXT, vocab_size=200)
