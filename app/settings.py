"""Configuration: one `Settings`, from env `MODEL_GATEWAY_*` over an optional YAML file.

Precedence: explicit arguments > environment > the YAML file named by
`MODEL_GATEWAY_CONFIG` > defaults. Nested fields take `__` in env names
(`MODEL_GATEWAY_VARIANTS='[...]'` as JSON, `MODEL_GATEWAY_PORT=9000`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Self, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_ENV = "MODEL_GATEWAY_CONFIG"
# The default model's served name: SmolLM2-135M-Instruct, which `prepare-model` builds.
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class BatchingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=1024)
    # A batch starts when it is full, when no request came for arrival_gap_ms (a burst has
    # ended), or when its oldest request has waited max_wait_ms.
    max_wait_ms: float = Field(20.0, ge=0, le=10_000)
    arrival_gap_ms: float = Field(2.0, ge=0, le=10_000)
    # Prompt + max new tokens summed over a batch; bounds the KV cache a batch can need.
    max_batch_tokens: int = Field(65_536, ge=1)
    max_queue_size: int = Field(256, ge=1)
    # Requests asking for more new tokens than this may hold every engine slot but one, so
    # that long generations never keep the others waiting (null: no such limit).
    long_request_tokens: int | None = Field(512, ge=1)


class CacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # In-process cache, used when no redis_url is set.
    memory_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    # Larger values are not stored, and are ignored when read.
    max_value_bytes: int = Field(1024 * 1024, ge=1)
    # Redis: a slow Redis must not slow requests down; after breaker_failures faults in
    # a row it is left alone for breaker_reset_s.
    timeout_ms: float = Field(50.0, gt=0, le=10_000)
    breaker_failures: int = Field(3, ge=1)
    breaker_reset_s: float = Field(5.0, gt=0)


class RoutingSettings(BaseModel):
    """Which replica answers (app/backends/routing.py)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["least_outstanding", "prefix", "session"] = "least_outstanding"
    # prefix: blocks of about 16 tokens (vLLM's KV-cache block) of the prompt as sent...
    block_bytes: int = Field(64, ge=1, le=1 << 20)
    # ...of which the first max_prompt_blocks (32 KB) are compared: enough to tell prefixes
    # apart, and a bound on the hashing a long prompt costs.
    max_prompt_blocks: int = Field(512, ge=1, le=1 << 16)
    # Blocks remembered per replica (about 4 MB each), and for how long: on the order of
    # how long an upstream keeps an idle prefix in its KV cache.
    max_blocks: int = Field(65_536, ge=1)
    ttl_s: float = Field(600.0, gt=0)
    # A replica holding the whole prefix loses it to a cold one once it has more than
    # 1/load_weight x (least load + 1) requests more in flight than the least loaded: at
    # 0.5, about three times that replica's load, when queueing outweighs a prefill saved.
    load_weight: float = Field(0.5, ge=0)
    # session: a replica over (1 + load_epsilon) x the mean load passes its users on.
    load_epsilon: float = Field(0.25, ge=0)


# The OpenAI API's fields that not every backend honours (`GenerationRequest.options`).
OptionName = Literal[
    "n", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "echo", "suffix", "tools", "tool_choice", "parallel_tool_calls",
    "functions", "function_call", "response_format",
]  # fmt: skip
OPTION_NAMES = frozenset(get_args(OptionName))


class UpstreamSettings(BaseModel):
    """OpenAI-compatible servers (our workers, vLLM, TGI, llama.cpp...) serving one model."""

    model_config = ConfigDict(extra="forbid")

    # Base URLs; a host name that resolves to several addresses (docker-compose --scale)
    # becomes one replica per address, resolved again every resolve_interval_s.
    replicas: list[str] = Field(min_length=1)
    model: str | None = None  # the model name upstream; default: the variant's name
    max_concurrency_per_replica: int = Field(256, ge=1)
    # Requests waiting at the gateway while every replica is at its cap; past it, 429.
    max_waiting: int = Field(1024, ge=0)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    # Send the request's priority class as vLLM's `priority` field (0 interactive, 1
    # standard, 2 batch). vLLM refuses it unless started with --scheduling-policy priority.
    forward_priority: bool = False
    # API fields this server does not honour (e.g. TGI or llama.cpp: tools, n, logprobs):
    # refused with a 400 naming them, rather than sent. Default: the whole API passes.
    unsupported: list[OptionName] = Field(default_factory=list)
    connect_timeout_s: float = Field(2.0, gt=0)
    health_check_interval_s: float = Field(2.0, gt=0)
    # What the health check asks: /health answers on vLLM, TGI and our workers; our workers'
    # /ready also fails while they drain before a shutdown, taking them out of rotation.
    health_path: str = Field("/health", pattern=r"^/")
    # Consecutive failures (requests or health checks) that take a replica out of rotation;
    # a passing health check brings it back.
    eject_after_failures: int = Field(2, ge=1)
    resolve_interval_s: float = Field(30.0, gt=0)

    @field_validator("replicas")
    @classmethod
    def _urls(cls, replicas: list[str]) -> list[str]:
        for url in replicas:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica {url!r} must be an http:// or https:// base URL")
        return [url.rstrip("/") for url in replicas]


class ShadowRole(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Share of the experiment's primary requests copied to this variant.
    sample_rate: float = Field(ge=0, le=1)


class VariantSettings(BaseModel):
    """A model and the backend that serves it. Top-level variants are served under their own
    `name`; inside an experiment, `name` labels the variant (metrics, `X-Variant`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(DEFAULT_MODEL_NAME, min_length=1, max_length=128, pattern=r"^[\w.:/-]+$")
    backend: Literal["ctranslate2", "openai"] = "ctranslate2"
    upstream: UpstreamSettings | None = None  # for backend "openai"
    model_path: Path = Path("models") / DEFAULT_MODEL_NAME
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # "default": the type the model was converted to (prepare-model makes int8, measured
    # fastest on CPU: BENCHMARKS.md), so a variant `quantize` made is served as made; another
    # type converts on load (an int8 model served as float32, for an A/B of the two), and
    # "auto" lets CTranslate2 pick.
    compute_type: str = "default"
    # Batches run at once. 0: one per CPU core on CPU (single-threaded batches in parallel
    # beat multi-threaded ones on small VMs), one on CUDA.
    inter_threads: int = Field(0, ge=0, le=64)
    intra_threads: int = Field(1, ge=0, le=64)
    default_max_tokens: int = Field(256, ge=1)
    cache_ttl_s: float = Field(3600.0, gt=0)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    # In an experiment: the share of traffic (relative to the other variants' weights), or
    # the shadow role (copies of requests, never answering them). Default weight: 1, or 0
    # for a shadow.
    weight: float | None = Field(None, ge=0, le=1_000_000)
    shadow: ShadowRole | None = None

    @model_validator(mode="after")
    def _backend_needs(self) -> Self:
        if self.backend == "openai" and self.upstream is None:
            raise ValueError(f"variant {self.name!r}: backend 'openai' needs 'upstream.replicas'")
        if self.backend == "ctranslate2" and self.upstream is not None:
            raise ValueError(f"variant {self.name!r}: 'upstream' is for backend 'openai'")
        if self.shadow is not None and self.weight:
            raise ValueError(
                f"variant {self.name!r}: a shadow gets copies of requests, not a weight; "
                "remove 'weight' or 'shadow'"
            )
        return self

    @property
    def effective_weight(self) -> float:
        if self.weight is not None:
            return self.weight
        return 0.0 if self.shadow is not None else 1.0


class KeyLimits(BaseModel):
    """Per key, over every gateway replica sharing `redis_url` (per process without it).
    Unset: no limit."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1, le=10**9)
    tokens_per_minute: int | None = Field(None, ge=1, le=10**12)  # prompt + completion
    max_concurrent: int | None = Field(None, ge=1, le=10**6)
    daily_tokens: int | None = Field(None, ge=1, le=10**15)  # per UTC day


PriorityClass = Literal["interactive", "standard", "batch"]


class KeySettings(BaseModel):
    """An API key: its name (metrics, usage, the sticky A/B key) and the SHA-256 of its
    secret, never the secret (`model-gateway keys create NAME` makes both)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[\w.:@-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The served model names it may use; null: all.
    models: list[str] | None = None
    limits: KeyLimits = Field(default_factory=KeyLimits)
    # The highest class its requests get (a request may ask for a lower one).
    priority: PriorityClass = "standard"
    revoked: bool = False


class RateLimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # With Redis down or slow, requests are let through ("open", counted in a metric) or
    # refused with 503 ("closed").
    on_redis_error: Literal["open", "closed"] = "open"
    timeout_ms: float = Field(50.0, gt=0, le=10_000)
    breaker_failures: int = Field(3, ge=1)
    breaker_reset_s: float = Field(5.0, gt=0)


class ExperimentSettings(BaseModel):
    """A served model name (what clients put in `model`) split between variants."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[\w.:/-]+$")
    # Clients may pick a variant with the header `X-Variant` (testing, debugging).
    allow_variant_header: bool = False
    variants: list[VariantSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _has_primary(self) -> Self:
        primaries = [v for v in self.variants if v.shadow is None]
        if not primaries:
            raise ValueError(
                f"experiment {self.name!r}: every variant is a shadow; a shadow needs a primary "
                "variant (one without 'shadow') to copy requests from"
            )
        if not any(v.effective_weight > 0 for v in primaries):
            raise ValueError(
                f"experiment {self.name!r}: all weights are zero; give at least one variant a "
                "positive weight"
            )
        return self


class ShadowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Shadow copies in flight per shadow variant and process; beyond it a copy is dropped
    # (and counted), so a slow shadow cannot pile up work.
    max_concurrency: int = Field(8, ge=1, le=10_000)
    # One JSON line per primary/shadow pair (request id, both outputs, timings).
    log_path: Path | None = None
    log_prompts: bool = True  # False: the log leaves the prompt out


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MODEL_GATEWAY_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # A log line per request costs a noticeable share of a core at high rates
    # (BENCHMARKS.md); the metrics and the X-Request-Id header cover the same ground.
    access_log: bool = False
    # Server processes. A gateway relaying tens of thousands of tokens/s needs several (one
    # event loop parses and re-encodes every token); each process loads its own local
    # models, so a worker serving a local engine wants 1.
    workers: int = Field(1, ge=1, le=64)
    # From arrival to the last token; past it the request ends with 504.
    request_timeout_s: float = Field(120.0, gt=0, le=3600)
    max_request_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # A body still arriving this long after its request is cut off (408); so is, beyond
    # max_body_readers bodies arriving at once, the one arriving longest (slow senders make
    # room for working clients).
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    max_body_readers: int = Field(256, ge=1, le=100_000)
    # On SIGTERM: for drain_s, /ready answers 503 (load balancers take this replica out of
    # rotation) while requests are still served; then no new connections are taken and
    # the requests in flight, streams included, get shutdown_timeout_s to finish.
    drain_s: float = Field(5.0, ge=0, le=600)
    shutdown_timeout_s: float = Field(30.0, gt=0, le=3600)
    # Open connections (uvicorn's limit_concurrency); past it a new one is answered 503.
    max_connections: int = Field(2048, ge=1, le=1_000_000)
    # Where `prepare-model` builds the default model, and its download cache.
    model_dir: Path = Path("models")
    # Shared state (the response cache) lives here when set, e.g. redis://localhost:6379/0.
    redis_url: str | None = None
    cache: CacheSettings = Field(default_factory=CacheSettings)
    # Models served under their own names. With neither variants nor experiments: the
    # default model.
    variants: list[VariantSettings] = Field(default_factory=list)
    experiments: list[ExperimentSettings] = Field(default_factory=list)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    # Generation calls and /v1/models need one of `keys` ("required"); or pass without a key
    # but not with an unknown one ("optional"); or ignore keys ("off": anyone who reaches
    # the port may generate).
    auth: Literal["required", "optional", "off"] = "required"
    keys: list[KeySettings] = Field(default_factory=list)
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    # `Authorization: Bearer <admin_token>` opens /admin/*; unset, the admin API is closed.
    admin_token: SecretStr | None = None
    # With redis_url, experiment changes made through the admin API are stored there and
    # every gateway replica polls them at this interval.
    experiment_sync_interval_s: float = Field(0.5, gt=0, le=60)
    # The experiment report covers this much recent traffic.
    report_window_s: float = Field(300.0, gt=0, le=86_400)

    @field_validator("auth", mode="before")
    @classmethod
    def _yaml_off(cls, auth: object) -> object:
        return "off" if auth is False else auth  # YAML 1.1 reads a bare `off` as false

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_none(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token (e.g. ADMIN_TOKEN= in a compose .env) keeps the admin API closed,
        # rather than opening it to an empty bearer.
        return token if token is not None and token.get_secret_value().strip() else None

    @model_validator(mode="after")
    def _default_and_unique_names(self) -> Self:
        if not self.variants and not self.experiments:
            if "variants" in self.model_fields_set:
                raise ValueError("nothing to serve: variants and experiments are both empty")
            self.variants = [VariantSettings()]
        for variant in self.variants:
            if variant.shadow is not None:
                raise ValueError(
                    f"variant {variant.name!r}: 'shadow' belongs to a variant of an experiment"
                )
        repeated = _repeated(v.name for v in self.all_variants())
        if repeated:
            raise ValueError(f"variant names must be unique; repeated: {repeated}")
        repeated = _repeated(k.name for k in self.keys)
        if repeated:
            raise ValueError(f"key names must be unique; repeated: {repeated}")
        if self.auth == "required" and not self.keys and not self.redis_url:
            raise ValueError(
                "auth is required but no keys are configured: add one to `keys` "
                "(`model-gateway keys create NAME` prints it), or set auth: off"
            )
        served = [e.name for e in self.all_experiments()]
        repeated = _repeated(served)
        if repeated:
            raise ValueError(
                "experiment names and top-level variant names are the served model names and "
                f"must be unique; repeated: {repeated}"
            )
        for key in self.keys:
            unknown = sorted(set(key.models or ()) - set(served))
            if unknown:
                raise ValueError(
                    f"key {key.name!r}: no served model {', '.join(unknown)}; "
                    f"served: {', '.join(served)}"
                )
        return self

    def all_experiments(self) -> list[ExperimentSettings]:
        """Every served model: the experiments, and each top-level variant as an experiment
        of one."""
        singles = [ExperimentSettings(name=v.name, variants=[v]) for v in self.variants]
        return singles + list(self.experiments)

    def all_variants(self) -> list[VariantSettings]:
        return self.variants + [v for e in self.experiments for v in e.variants]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            if not Path(config_file).is_file():
                raise ValueError(f"{CONFIG_ENV}={config_file}: no such file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


def _repeated(names: Iterable[str]) -> str:
    """The names that occur more than once, listed; empty if none."""
    seen = Counter(names)
    return ", ".join(sorted(name for name, count in seen.items() if count > 1))


def describe_error(error: ValidationError, config_file: str | None) -> str:
    """The settings errors, each with the line of the YAML file it points at."""
    root: yaml.Node | None = None
    if config_file:
        try:
            root = yaml.compose(Path(config_file).read_text())
        except (OSError, yaml.YAMLError):
            root = None
    lines = []
    for problem in error.errors():
        loc = list(problem["loc"])
        where = ".".join(str(part) for part in loc) or "settings"
        line = _yaml_line(root, loc)
        prefix = f"{config_file}, line {line}: " if line else ""
        message = str(problem["msg"]).removeprefix("Value error, ")
        lines.append(f"{prefix}{where}: {message}")
    return "\n".join(lines)


def _yaml_line(node: yaml.Node | None, loc: list[int | str]) -> int | None:
    """The 1-based line of the deepest node of the YAML document on the path `loc`."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
