"""Live experiment state: who gets which share, who shadows whom.

It starts from the config; the admin API changes it. With Redis, every change is stored
under a versioned key that all gateway replicas poll (so a change reaches them within
`experiment_sync_interval_s` and survives restarts); without Redis it is process-local.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as redis

from app.domain import InvalidRequestError, ModelNotFoundError, NotFoundError, NotReadyError
from app.experiments.assignment import Assignment, choose_variant, sample_shadows
from app.settings import ExperimentSettings
from app.shared_state import RedisShared

logger = logging.getLogger(__name__)

_KEY_PREFIX = "model-gateway:v1:experiment:"
_VERSION_KEY = "model-gateway:v1:experiments-version"


@dataclass(frozen=True)
class ExperimentState:
    """Weights of the variants that answer requests, sample rates of those that shadow
    them. A variant is in at most one of the two (or in neither: off)."""

    weights: Mapping[str, float]
    shadows: Mapping[str, float] = field(default_factory=dict)
    version: int = 0  # 0: from the config; from Redis: the store's counter

    def check(self, config: ExperimentSettings) -> None:
        """Raise `InvalidRequestError` unless this state fits the experiment."""
        known = {v.name for v in config.variants}
        for name in [*self.weights, *self.shadows]:
            if name not in known:
                raise InvalidRequestError(
                    f"experiment {config.name!r} has no variant {name!r}; "
                    f"its variants: {', '.join(sorted(known))}"
                )
        for name, weight in self.weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise InvalidRequestError(f"weight of {name!r} must be a number >= 0")
        for name, rate in self.shadows.items():
            if not 0 <= rate <= 1:
                raise InvalidRequestError(f"sample rate of shadow {name!r} must be in [0, 1]")
            if self.weights.get(name, 0) > 0:
                raise InvalidRequestError(
                    f"{name!r} cannot both answer requests (weight > 0) and shadow them"
                )
        if not any(w > 0 for w in self.weights.values()):
            raise InvalidRequestError(
                f"experiment {config.name!r} needs a variant with a positive weight"
            )

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, "weights": dict(self.weights),
                "shadows": dict(self.shadows)}  # fmt: skip

    @classmethod
    def from_config(cls, config: ExperimentSettings) -> ExperimentState:
        weights = {v.name: v.effective_weight for v in config.variants if v.shadow is None}
        shadows = {v.name: v.shadow.sample_rate for v in config.variants if v.shadow is not None}
        return cls(weights, shadows)


class Experiments(RedisShared[list[bytes | str | None]]):
    def __init__(
        self,
        configs: list[ExperimentSettings],
        redis_url: str | None = None,
        sync_interval_s: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(redis_url, sync_interval_s, "experiment")
        self.configs = {c.name: c for c in configs}
        self._states = {c.name: ExperimentState.from_config(c) for c in configs}
        self._rng = rng or random.Random()
        self._ignored: dict[str, bytes | str] = {}

    def names(self) -> list[str]:
        return list(self.configs)

    def config(self, name: str) -> ExperimentSettings:
        try:
            return self.configs[name]
        except KeyError:
            raise NotFoundError(f"no experiment {name!r}") from None

    def state(self, name: str) -> ExperimentState:
        self.config(name)
        return self._states[name]

    def assign(self, model: str, user_key: str | None, forced_variant: str | None) -> Assignment:
        """The variant for a request to the served model `model`, and its shadow copies;
        raises if the model is unknown or the forced variant not allowed."""
        config = self.configs.get(model)
        if config is None:
            raise ModelNotFoundError(
                f"The model {model!r} does not exist; available: {', '.join(self.configs)}",
                param="model",
            )
        state = self._states[model]
        if forced_variant is not None:
            if not config.allow_variant_header:
                raise InvalidRequestError(
                    f"the X-Variant header is not enabled for {model!r} "
                    "(allow_variant_header in its experiment's config)"
                )
            if forced_variant not in {v.name for v in config.variants}:
                raise InvalidRequestError(
                    f"X-Variant: {model!r} has no variant {forced_variant!r}; "
                    f"its variants: {', '.join(v.name for v in config.variants)}"
                )
            variant = forced_variant
        else:
            variant = choose_variant(state.weights, user_key, self._rng)
        shadows = tuple(
            name for name in sample_shadows(state.shadows, self._rng) if name != variant
        )
        return Assignment(model, variant, shadows)

    async def update(
        self,
        name: str,
        weights: Mapping[str, float] | None = None,
        shadows: Mapping[str, float | None] | None = None,
    ) -> ExperimentState:
        """Change weights and shadow rates (a rate of None ends that shadow role); variants
        not named keep theirs."""
        state = self.state(name)
        new_weights = dict(state.weights) | dict(weights or {})
        new_shadows = dict(state.shadows)
        for variant, rate in (shadows or {}).items():
            if rate is None:
                new_shadows.pop(variant, None)
            else:
                new_shadows[variant] = rate
                new_weights.setdefault(variant, 0.0)
        for variant, weight in (weights or {}).items():
            if weight > 0 and variant not in (shadows or {}):
                new_shadows.pop(variant, None)  # given a weight: it answers now
        return await self._apply(name, ExperimentState(new_weights, new_shadows))

    async def promote(
        self, name: str, variant: str, previous_shadow_rate: float | None = None
    ) -> ExperimentState:
        """`variant` takes all the traffic; the variant that had the most becomes a shadow
        with `previous_shadow_rate` when given."""
        state = self.state(name)
        ExperimentState({variant: 1.0}).check(self.config(name))
        previous = max(state.weights, key=lambda v: state.weights[v])
        weights = dict.fromkeys(state.weights, 0.0) | {variant: 1.0}
        shadows = {k: v for k, v in state.shadows.items() if k != variant}
        if previous_shadow_rate is not None and previous != variant:
            shadows[previous] = previous_shadow_rate
        return await self._apply(name, ExperimentState(weights, shadows))

    async def _apply(self, name: str, state: ExperimentState) -> ExperimentState:
        state.check(self.configs[name])
        if self._redis is not None:
            try:
                version = int(await self._redis.incr(_VERSION_KEY))
                state = replace(state, version=version)
                await self._redis.set(_KEY_PREFIX + name, json.dumps(state.as_json()))
            except redis.RedisError as exc:
                raise NotReadyError(f"could not store the change in Redis: {exc}") from exc
        else:
            state = replace(state, version=self._states[name].version + 1)
        self._states[name] = state
        logger.info("experiment %s is now %s", name, state.as_json())
        return state

    async def _read(self, client: redis.Redis) -> list[bytes | str | None]:
        return list(await client.mget([_KEY_PREFIX + n for n in self.configs]))

    def _take(self, values: list[bytes | str | None]) -> None:
        """Take the stored states that differ from ours. A stored state that no longer fits
        the config (a variant was removed) is ignored: the config wins."""
        names = list(self.configs)
        for name, value in zip(names, values, strict=True):
            if value is None:
                continue
            try:
                stored = json.loads(value)
                state = ExperimentState(
                    weights={str(k): float(v) for k, v in stored["weights"].items()},
                    shadows={str(k): float(v) for k, v in stored["shadows"].items()},
                    version=int(stored["version"]),
                )
                state.check(self.configs[name])
            except (ValueError, KeyError, TypeError, AttributeError, InvalidRequestError) as exc:
                if self._ignored.get(name) != value:  # once per stored value, not every poll
                    logger.warning("ignoring the stored state of experiment %s: %s", name, exc)
                    self._ignored[name] = value
                continue
            if state.version != self._states[name].version:
                self._states[name] = state
                logger.info("experiment %s changed: %s", name, state.as_json())
