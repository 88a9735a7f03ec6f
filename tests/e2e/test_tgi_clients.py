"""The real default model behind a live server, called with TGI's official clients: the
`text-generation` client and `huggingface_hub.InferenceClient`, both posting to TGI's root
route. Greedy, so a streamed answer equals the whole one."""

from __future__ import annotations

import huggingface_hub
import pytest
import text_generation

PROMPT = "The capital of France is"
# text-generation 0.7 (its last release) still calls pydantic's v1 `dict()`.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")


@pytest.fixture
def tgi(server: str) -> text_generation.Client:
    return text_generation.Client(server, timeout=60)


def test_text_generation_client(tgi: text_generation.Client) -> None:
    reply = tgi.generate(PROMPT, max_new_tokens=8)  # this client always asks for details
    assert reply.generated_text.strip()
    details = reply.details
    assert details.finish_reason in ("length", "eos_token")
    assert details.generated_tokens == len(details.tokens) <= 8
    assert "".join(t.text for t in details.tokens) == reply.generated_text
    streamed = list(tgi.generate_stream(PROMPT, max_new_tokens=8))
    assert "".join(r.token.text for r in streamed) == reply.generated_text
    assert streamed[-1].generated_text == reply.generated_text
    assert streamed[-1].details is not None
    assert streamed[-1].details.generated_tokens == details.generated_tokens


def test_huggingface_hub_inference_client(server: str, tgi: text_generation.Client) -> None:
    client = huggingface_hub.InferenceClient(base_url=server, timeout=60)
    expected = tgi.generate(PROMPT, max_new_tokens=8).generated_text
    assert client.text_generation(PROMPT, max_new_tokens=8) == expected
    detailed = client.text_generation(PROMPT, max_new_tokens=8, details=True)
    assert detailed.generated_text == expected
    assert detailed.details is not None
    assert detailed.details.generated_tokens == len(detailed.details.tokens)
    pieces = client.text_generation(PROMPT, max_new_tokens=8, stream=True)
    assert "".join(pieces) == expected
    events = list(client.text_generation(PROMPT, max_new_tokens=8, stream=True, details=True))
    assert events[-1].generated_text == expected
    assert events[-1].details is not None
