"""What the gateway sends upstream: every parameter it understands, vLLM's extras only when
set, and whatever else the client sent (nothing dropped), never overriding our own fields."""

from __future__ import annotations

from app.backends.openai import OpenAIBackend
from app.domain import ChatMessage, GenerationRequest, PreparedRequest, SamplingParams
from app.metrics import Metrics
from app.settings import VariantSettings


def backend() -> OpenAIBackend:
    variant = VariantSettings(
        name="llama", backend="openai", upstream={"replicas": ["http://vllm:8000"], "model": "m"}
    )
    return OpenAIBackend(variant, Metrics())


def test_completion_payload() -> None:
    request = GenerationRequest(
        model="llama",
        prompt="Once",
        max_tokens=16,
        stop=("\n",),
        sampling=SamplingParams(
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            seed=3,
            min_tokens=2,
            repetition_penalty=1.1,
            ignore_eos=True,
        ),
        extra={"min_p": 0.05, "model": "client-value", "stream": False},
    )
    payload = backend()._payload(backend().prepare(request))
    assert payload["model"] == "m"  # ours win over the client's extras
    assert payload["stream"] is True
    assert payload["min_p"] == 0.05  # unknown to us, forwarded
    assert payload["prompt"] == "Once"
    assert payload["max_tokens"] == 16
    assert payload["stop"] == ["\n"]
    assert (payload["top_k"], payload["seed"], payload["min_tokens"]) == (40, 3, 2)
    assert (payload["repetition_penalty"], payload["ignore_eos"]) == (1.1, True)


def test_chat_payload_leaves_unset_extras_out() -> None:
    request = GenerationRequest(
        model="llama", messages=(ChatMessage("user", "hi"),), sampling=SamplingParams(0.0)
    )
    payload = backend()._payload(PreparedRequest(request, "[]", 8))
    assert payload["messages"] == [{"role": "user", "content": "hi"}]
    assert "prompt" not in payload
    for absent in ("top_k", "seed", "min_tokens", "ignore_eos", "repetition_penalty", "stop"):
        assert absent not in payload


def test_a_client_wanting_one_body_gets_the_upstreams_body() -> None:
    request = GenerationRequest(model="llama", prompt="Once", stream=False)
    payload = backend()._payload(PreparedRequest(request, "Once", 8))
    assert payload["stream"] is False
    assert "stream_options" not in payload
