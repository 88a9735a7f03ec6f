"""Incremental detokenization and stop sequences, on a real byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from app.backends.ctranslate2.tokenizer import Detokenizer
from tests.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def stream(tokenizer: Tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], str]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detok = Detokenizer(tokenizer, [], stop)
    pieces = [detok.add(i) for i in ids]
    if not detok.stopped:
        pieces.append(detok.flush())
    return pieces, detok.text


@pytest.mark.parametrize(
    "text", ["héllo wörld", "日本語のテキスト", "emoji 🚀🔥 end", "plain ascii"]
)
def test_multibyte_characters_are_never_split(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if text != "plain ascii":
        assert len(ids) > len(text.split()), "the tokenizer should split these into bytes"
    pieces, full = stream(tokenizer, text)
    assert "".join(pieces) == full == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_sequence_ends_text_before_it(tokenizer: Tokenizer) -> None:
    pieces, full = stream(tokenizer, "The quick brown fox jumps over the lazy dog.", ("fox",))
    assert full == "The quick brown "
    assert "".join(pieces) == full


def test_text_that_may_start_a_stop_sequence_is_held_back(tokenizer: Tokenizer) -> None:
    detok = Detokenizer(tokenizer, [], ("brown fox",))
    released = ""
    for i in tokenizer.encode("The quick brown", add_special_tokens=False).ids:
        released += detok.add(i)
    assert released == "The quick "  # "brown" might still become "brown fox"
    for i in tokenizer.encode(" cat", add_special_tokens=False).ids:
        released += detok.add(i)
    assert released == "The quick brown cat"
    assert not detok.stopped


def test_held_back_text_is_released_at_the_end(tokenizer: Tokenizer) -> None:
    pieces, full = stream(tokenizer, "ends with bro", ("brown",))
    assert full == "ends with bro"
    assert pieces[-1].endswith("bro")


def test_earliest_of_several_stop_sequences_wins(tokenizer: Tokenizer) -> None:
    _, full = stream(tokenizer, "one two three four", ("four", "two"))
    assert full == "one "


def test_stop_sequence_spanning_tokens(tokenizer: Tokenizer) -> None:
    _, full = stream(tokenizer, "The capital of France is Paris.", ("e is P",))
    assert full == "The capital of Franc"
