"""The gateway's overhead (its time less the time waiting on the upstream) on a live process in
front of a slow stub upstream: the X-Gateway-Overhead-Ms header and the overhead histogram
leave the upstream's time out."""

from __future__ import annotations

import json

import httpx

from tests.live_server import live_server, metric_value
from tests.stub_upstream import StubUpstream

REPLY_DELAY_S = 0.3
CHUNKS, CHUNK_INTERVAL_S = 4, 0.1


def test_the_overhead_leaves_the_upstreams_time_out() -> None:
    stub = StubUpstream(
        reply_delay_s=REPLY_DELAY_S, chunks=CHUNKS, chunk_interval_s=CHUNK_INTERVAL_S
    )
    with stub:
        variants = [{"name": "up", "backend": "openai", "upstream": {"replicas": [stub.url]}}]
        with live_server(variants, cache=json.dumps({"enabled": False})) as url:
            body = {"model": "up", "prompt": "hello", "max_tokens": 4}
            reply = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert reply.status_code == 200, reply.text
            total_ms = float(reply.headers["x-total-time"])
            overhead_ms = float(reply.headers["x-gateway-overhead-ms"])
            assert total_ms >= 1000 * REPLY_DELAY_S
            # The upstream's 300 ms are not the gateway's; its own share is a few ms.
            assert 0 <= overhead_ms < total_ms - 250

            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                              timeout=30) as streamed:  # fmt: skip
                assert streamed.status_code == 200
                # Sent with the first event: the overhead so far, within the time to it.
                first_ms = float(streamed.headers["x-gateway-overhead-ms"])
                assert 0 <= first_ms <= float(streamed.headers["x-time-to-first-token"])
                events = [line for line in streamed.iter_lines() if line.startswith("data:")]
            assert events[-1] == "data: [DONE]"

            labels = {"variant": "up", "endpoint": "/v1/completions"}
            assert metric_value(url, "model_gateway_overhead_seconds_count", **labels) == 2
            overhead_s = metric_value(url, "model_gateway_overhead_seconds_sum", **labels)
            duration_s = metric_value(url, "model_gateway_request_duration_seconds_sum",
                                      endpoint="/v1/completions")  # fmt: skip
            # Both requests waited at least 0.3 s each on the upstream.
            assert duration_s >= REPLY_DELAY_S + CHUNKS * CHUNK_INTERVAL_S
            assert 0 < overhead_s < duration_s - 0.6
