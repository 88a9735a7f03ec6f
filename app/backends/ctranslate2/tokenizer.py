"""Tokenization for local engines: `tokenizers` plus the model's Jinja chat template.

Serving needs neither torch nor transformers: the chat template is rendered with a sandboxed
Jinja environment configured as transformers configures it, which yields the same token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from app.backends.ctranslate2.model import ModelMetadata
from app.domain import LONG_PROMPT_CHARS, ChatMessage, InvalidRequestError


def _raise_template_error(message: str) -> NoReturn:
    raise InvalidRequestError(f"the chat template refused the messages: {message}")


class ModelTokenizer:
    def __init__(self, model_dir: Path, metadata: ModelMetadata) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._metadata = metadata
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.end_token_ids = frozenset(self.token_id(token) for token in metadata.end_tokens)
        self._template: jinja2.Template | None = None
        if metadata.chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(metadata.chat_template)

    def token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._encode(text, add_special_tokens=True)

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        if len(text) < LONG_PROMPT_CHARS:
            return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        # encode_batch lets go of the GIL while it works (encode does not): a long text
        # tokenized in another thread then leaves the event loop free.
        (encoding,) = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if self._template is None:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        text = self._template.render(
            # Tool calls, a tool result's id, names: the template decides what it renders.
            messages=[{**(m.raw or {}), "role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=self._metadata.bos_token or "",
            eos_token=self._metadata.eos_token or "",
        )
        # The template already placed every special token the model expects.
        return self._encode(text, add_special_tokens=False)

    def tokens(self, ids: list[int]) -> list[str]:
        return [self._tokenizer.id_to_token(i) or "" for i in ids]

    def detokenizer(self, prompt_ids: list[int], stop: tuple[str, ...]) -> Detokenizer:
        return Detokenizer(self._tokenizer, prompt_ids, stop)


class Detokenizer:
    """Turns generated ids into text as they come, never splitting a multi-byte character,
    and never releasing text that may turn out to be the start of a stop sequence."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        # A few prompt ids give the decoder the context it needs for leading spaces.
        self._stream = DecodeStream(ids=prompt_ids[-4:], skip_special_tokens=True)
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._text = ""
        self._released = 0
        self.stopped = False  # a stop sequence was found; nothing more will be released

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text[: self._released]

    def add(self, token_id: int) -> str:
        """Feed one generated id; return the text it releases."""
        if self.stopped:
            return ""
        piece = self._stream.step(self._tokenizer, token_id)
        if piece:
            self._text += piece
        if not self._stop:
            return self._release(len(self._text))
        search_from = max(0, self._released - self._longest_stop + 1)
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            end = max(min(hits), self._released)
            self._text = self._text[:end]
            return self._release(end)
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> str:
        """Release what was held back; call when the sequence ends without a stop sequence."""
        return self._release(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of a stop sequence."""
        for length in range(min(self._longest_stop - 1, len(self._text)), 0, -1):
            tail = self._text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0

    def _release(self, end: int) -> str:
        if end <= self._released:
            return ""
        out = self._text[self._released : end]
        self._released = end
        return out
