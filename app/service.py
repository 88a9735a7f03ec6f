"""`GenerationService.handle()`: the data path from a validated request to its reply, the
same whether this process is a gateway or a worker.

1. assignment: the variant that answers (sticky A/B split) and the shadows that get a copy
2. the variant's backend, through the cache layer where a cache is configured: prepare
   (prompt tokens, token budget), then generate
3. the observing layer on the way up: metrics, the reply's timings, the report's outcome,
   and the primary's side of each shadow pair
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

from app.backends import Backend
from app.domain import (
    GatewayError,
    GenerationEvent,
    GenerationRequest,
    PermissionDeniedError,
    Reply,
    RequestContext,
    Tenant,
    Timings,
)
from app.experiments.assignment import Assignment
from app.experiments.report import Outcome, ReportWindow
from app.experiments.shadow import ShadowRunner
from app.experiments.state import Experiments
from app.observing import Observer

logger = logging.getLogger(__name__)


class GenerationService:
    def __init__(
        self,
        backends: Mapping[str, Backend],
        served: Mapping[str, Backend],
        experiments: Experiments,
        observer: Observer,
        window: ReportWindow,
        shadows: ShadowRunner,
    ) -> None:
        """`backends`: each variant's own; `served`: what answers its requests (the same,
        or the cache layer around it). Shadow copies go to the variant's own backend."""
        self._backends = dict(backends)
        self._served = dict(served)
        self.experiments = experiments
        self._observer = observer
        self.window = window
        self._shadows = shadows

    def model_names(self, tenant: Tenant | None = None) -> list[str]:
        """The served models (those `tenant` may use)."""
        names = self.experiments.names()
        return names if tenant is None else [n for n in names if tenant.may_use(n)]

    def default_model(self) -> str:
        """The model of APIs that name none (TGI, SageMaker): the first configured."""
        return self.experiments.names()[0]

    def ready(self) -> bool:
        """Every variant that answers requests is ready. Shadows and variants without weight
        do not count: a dead shadow must not take the gateway out of its load balancer."""
        experiments = self.experiments
        return all(
            self._backends[variant].ready
            for name in experiments.names()
            for variant, weight in experiments.state(name).weights.items()
            if weight > 0
        )

    def handle(self, request: GenerationRequest, context: RequestContext) -> Reply:
        """Raises at once if the model is unknown or the forced variant not allowed; errors
        about the request itself come before the reply's first event, faults (engine,
        deadline) later."""
        tenant = context.tenant
        # 403 rather than 404: the served model names are not secret (/v1/models lists
        # them), and the status tells the caller to fix the key, not the model name.
        if tenant is not None and not tenant.may_use(request.model):
            self._observer.rejected(tenant.name, "forbidden_model")
            raise PermissionDeniedError(
                f"the API key {tenant.name!r} may not use the model {request.model!r}",
                param="model",
            )
        assignment = self.experiments.assign(
            request.model, context.user_key, context.forced_variant
        )
        timings = Timings()
        return Reply(assignment.variant, self._answer(assignment, request, context, timings),
                     timings)  # fmt: skip

    async def _answer(
        self,
        assignment: Assignment,
        request: GenerationRequest,
        context: RequestContext,
        timings: Timings,
    ) -> AsyncIterator[GenerationEvent]:
        pairs = []
        for shadow in assignment.shadows:
            copy = self._shadow_copy(assignment.experiment, shadow, request, context)
            pair = self._shadows.launch(assignment.experiment, request, context, shadow, copy)
            if pair is not None:
                pairs.append(pair)
        outcome = Outcome(assignment.variant)
        backend = self._served[assignment.variant]
        try:
            async for event in self._observer.observe(
                assignment.experiment, backend, request, context, timings, outcome
            ):
                yield event
        finally:
            for pair in pairs:
                pair.primary_done(outcome)

    async def _shadow_copy(
        self, experiment: str, shadow: str, request: GenerationRequest, context: RequestContext
    ) -> Outcome:
        outcome = Outcome(shadow)
        # Straight to the shadow's own backend, past the cache: its latency is compared.
        backend = self._backends[shadow]
        copy = replace(request, stream=False)
        try:
            async for _ in self._observer.observe(
                experiment, backend, copy, context, Timings(), outcome
            ):
                pass
        except GatewayError:
            pass  # recorded in `outcome`
        except Exception:
            logger.exception("shadow %s of request %s failed", shadow, context.request_id)
        return outcome
