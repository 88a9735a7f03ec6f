"""The source of deploy/grafana/dashboards/model-gateway.json: `make dashboard` writes it.

Panels are listed as (title, unit, [(PromQL, legend)]) per row; a test runs every
expression against a real Prometheus. Grafana variables: $variant, $instance,
$__rate_interval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "model-gateway.json"

SEL = 'variant=~"$variant", instance=~"$instance"'
INST = 'instance=~"$instance"'
RATE = "$__rate_interval"


TOTAL = f"sum by (variant) (rate(model_gateway_requests_total{{{SEL}}}[{RATE}]))"


def errors(status: str, by: str = "variant") -> str:
    """Requests/s with the given status; 0 rather than no data when there are none."""
    some = (
        f'sum by ({by}) (rate(model_gateway_requests_total{{{SEL}, status=~"{status}"}}[{RATE}]))'
    )
    return f"{some} or ({TOTAL} * 0)"


def quantiles(metric: str, by: str = "variant") -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


Panel = tuple[str, str, list[tuple[str, str]]]
ROWS: list[tuple[str, list[Panel]]] = [
    ("Traffic and errors", [
        ("Requests/s by variant and status", "reqps", [
            (f"sum by (variant, status) (rate(model_gateway_requests_total{{{SEL}}}[{RATE}]))",
             "{{variant}} {{status}}"),
        ]),
        ("Error ratio (5xx) by variant", "percentunit", [
            (f"({errors('5..')}) / {TOTAL}", "{{variant}}"),
        ]),
        ("Refused (429) and timed out (504) per second", "reqps", [
            (errors("504", "variant, status"), "{{variant}} {{status}}"),
            (errors("429", "variant, status"), "{{variant}} {{status}}"),
        ]),
        ("Upstream replica choices/s by policy and reason", "reqps", [
            (f"sum by (variant, policy, reason) (rate(model_gateway_route_decisions_total"
             f"{{{SEL}}}[{RATE}]))", "{{variant}} {{policy}} {{reason}}"),
        ]),
        ("Requests in flight by endpoint", "short", [
            (f"sum by (endpoint) (model_gateway_requests_in_flight{{{INST}}})", "{{endpoint}}"),
        ]),
    ]),
    ("Latency", [
        ("End-to-end latency", "s", quantiles("model_gateway_request_duration_seconds")),
        ("Time to first token", "s", quantiles("model_gateway_time_to_first_token_seconds")),
        ("Inter-token latency", "s", quantiles("model_gateway_inter_token_latency_seconds")),
        ("Gateway overhead (its time less the upstream's)", "s",
         quantiles("model_gateway_overhead_seconds", "endpoint")),
    ]),
    ("Throughput", [
        ("Generated tokens/s by variant", "short", [
            (f"sum by (variant) (rate(model_gateway_generation_tokens_total{{{SEL}}}[{RATE}]))",
             "{{variant}}"),
        ]),
        ("Prompt tokens/s by variant", "short", [
            (f"sum by (variant) (rate(model_gateway_prompt_tokens_total{{{SEL}}}[{RATE}]))",
             "{{variant}}"),
        ]),
        ("Engine sequences/s by outcome", "short", [
            (f"sum by (variant, outcome) (rate(model_gateway_engine_sequences_total{{{SEL}}}"
             f"[{RATE}]))", "{{variant}} {{outcome}}"),
        ]),
    ]),
    ("Batching", [
        ("Queue depth", "short", [
            (f"sum by (variant) (model_gateway_queue_depth{{{SEL}}})", "{{variant}}"),
        ]),
        ("Queue wait", "s", quantiles("model_gateway_queue_wait_seconds")),
        ("Batch size", "short", [
            (f"sum by (variant) (rate(model_gateway_batch_size_sum{{{SEL}}}[{RATE}])) / "
             f"sum by (variant) (rate(model_gateway_batch_size_count{{{SEL}}}[{RATE}]))",
             "mean {{variant}}"),
            (f"histogram_quantile(0.95, sum by (le, variant) (rate("
             f"model_gateway_batch_size_bucket{{{SEL}}}[{RATE}])))", "p95 {{variant}}"),
        ]),
    ]),
    ("Response cache", [
        ("Cache hit ratio by variant", "percentunit", [
            (f'sum by (variant) (rate(model_gateway_cache_requests_total{{{SEL}, result="hit"}}'
             f"[{RATE}])) / sum by (variant) (rate(model_gateway_cache_requests_total{{{SEL}, "
             f'result=~"hit|miss"}}[{RATE}]))', "{{variant}}"),
        ]),
        ("Cache lookups/s by result", "reqps", [
            (f"sum by (variant, result) (rate(model_gateway_cache_requests_total{{{SEL}}}"
             f"[{RATE}]))", "{{variant}} {{result}}"),
        ]),
        ("Requests coalesced onto one generation/s", "reqps", [
            (f"sum by (variant) (rate(model_gateway_cache_coalesced_total{{{SEL}}}[{RATE}]))",
             "{{variant}}"),
        ]),
    ]),
    ("Experiments: shadow comparisons", [
        ("Shadow pairs/s by outcome", "reqps", [
            (f"sum by (experiment, shadow, outcome) (rate(model_gateway_shadow_comparisons_total"
             f"{{{INST}}}[{RATE}]))", "{{experiment}} {{shadow}} {{outcome}}"),
        ]),
        ("Shadow exact-match ratio", "percentunit", [
            (f"sum by (experiment, shadow) (rate(model_gateway_shadow_comparisons_total{{{INST}, "
             f'outcome="match"}}[{RATE}])) / sum by (experiment, shadow) (rate('
             f'model_gateway_shadow_comparisons_total{{{INST}, outcome=~"match|mismatch"}}'
             f"[{RATE}]))", "{{experiment}} {{shadow}}"),
        ]),
        ("Shadow similarity to the primary", "percentunit", [
            (f"histogram_quantile({q}, sum by (le, experiment, shadow) (rate("
             f"model_gateway_shadow_similarity_bucket{{{INST}}}[{RATE}])))",
             f"p{int(q * 100)} {{{{experiment}}}} {{{{shadow}}}}")
            for q in (0.5, 0.1)
        ]),
    ]),
    ("API keys", [
        ("Requests/s by key", "reqps", [
            (f"sum by (key) (rate(model_gateway_key_requests_total{{{INST}}}[{RATE}]))",
             "{{key}}"),
        ]),
        ("Tokens/s by key", "short", [
            (f"sum by (key, type) (rate(model_gateway_key_tokens_total{{{INST}}}[{RATE}]))",
             "{{key}} {{type}}"),
        ]),
        ("Refused/s by key and reason", "reqps", [
            (f"sum by (key, reason) (rate(model_gateway_key_rejections_total{{{INST}}}"
             f"[{RATE}]))", "{{key}} {{reason}}"),
        ]),
        ("Limit checks Redis did not answer/s", "reqps", [
            (f"sum(rate(model_gateway_rate_limit_errors_total{{{INST}}}[{RATE}]))", "unchecked"),
        ]),
    ]),
    ("Process", [
        ("CPU (cores)", "short", [
            (f"rate(process_cpu_seconds_total{{{INST}}}[{RATE}])", "{{instance}}"),
        ]),
        ("Resident memory", "bytes", [
            (f"process_resident_memory_bytes{{{INST}}}", "{{instance}}"),
        ]),
    ]),
    ("GPU", [
        ("GPU utilization", "percentunit", [
            (f"model_gateway_gpu_utilization_ratio{{{INST}}}", "{{instance}} gpu {{gpu}}"),
        ]),
        ("GPU memory", "bytes", [
            (f"model_gateway_gpu_memory_used_bytes{{{INST}}}", "used {{instance}} gpu {{gpu}}"),
            (f"model_gateway_gpu_memory_total_bytes{{{INST}}}",
             "total {{instance}} gpu {{gpu}}"),
        ]),
        ("GPU power", "watt", [
            (f"model_gateway_gpu_power_watts{{{INST}}}", "{{instance}} gpu {{gpu}}"),
        ]),
        ("GPU temperature", "celsius", [
            (f"model_gateway_gpu_temperature_celsius{{{INST}}}", "{{instance}} gpu {{gpu}}"),
        ]),
    ]),
    ("vLLM", [
        ("vLLM KV-cache usage", "percentunit", [
            ("vllm:kv_cache_usage_perc", "{{instance}}"),
        ]),
        ("vLLM running and waiting requests", "short", [
            ("vllm:num_requests_running", "running {{instance}}"),
            ("vllm:num_requests_waiting", "waiting {{instance}}"),
        ]),
    ]),
]  # fmt: skip


def _panel(panel_id: int, title: str, unit: str, targets: list[tuple[str, str]], x: int,
           y: int) -> dict[str, Any]:  # fmt: skip
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def _variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for row_title, row_panels in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        next_id += 1
        y += 1
        for i, (title, unit, targets) in enumerate(row_panels):
            x = (i % 3) * 8
            if i and i % 3 == 0:
                y += 8
            panels.append(_panel(next_id, title, unit, targets, x, y))
            next_id += 1
        y += 8
    return {
        "uid": "model-gateway",
        "title": "model-gateway",
        "tags": ["llm", "serving"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                _variable("instance", "label_values(model_gateway_requests_total, instance)"),
                _variable("variant", "label_values(model_gateway_requests_total, variant)"),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
