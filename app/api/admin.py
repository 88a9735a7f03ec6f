"""The admin API: read experiments and their report, change weights and shadows live,
promote a variant. Every route needs `Authorization: Bearer <admin_token>`; without an
`admin_token` in the settings the admin API is closed. Errors are OpenAI error objects."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from app.api import get_service
from app.api.errors import documented_errors
from app.domain import AuthenticationError, PermissionDeniedError
from app.service import GenerationService


async def require_admin(request: Request) -> None:
    token = request.app.state.settings.admin_token
    if token is None:
        raise PermissionDeniedError(
            "the admin API is closed: set admin_token (env MODEL_GATEWAY_ADMIN_TOKEN) to open it"
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise AuthenticationError("the admin API needs the header Authorization: Bearer <token>")


router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=documented_errors(openai=True, statuses=(400, 401, 403, 404, 413, 503)),
)

Weight = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]
SampleRate = Annotated[float, Field(ge=0, le=1)]


class ExperimentChange(BaseModel):
    """Variants not named keep what they have. A shadow rate of null ends that shadow role;
    a positive weight makes a shadow answer requests instead."""

    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Weight] | None = None
    shadows: dict[str, SampleRate | None] | None = None


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str = Field(min_length=1, max_length=128)
    # The variant that had the most traffic keeps a copy of it, at this rate.
    previous_shadow_rate: SampleRate | None = None


def _describe(service: GenerationService, name: str) -> dict[str, Any]:
    config = service.experiments.config(name)
    state = service.experiments.state(name)
    return {
        "name": name,
        "version": state.version,
        "allow_variant_header": config.allow_variant_header,
        "weights": dict(state.weights),
        "shadows": dict(state.shadows),
        "variants": [{"name": v.name, "backend": v.backend} for v in config.variants],
    }


@router.get("/experiments")
async def list_experiments(request: Request) -> dict[str, Any]:
    service = get_service(request)
    return {
        "object": "list",
        "data": [_describe(service, name) for name in service.experiments.names()],
    }


@router.get("/experiments/{name:path}")
async def experiment(name: str, request: Request) -> dict[str, Any]:
    """The experiment and its report over the recent window."""
    service = get_service(request)
    experiments = service.experiments
    report = service.window.report(experiments.config(name), experiments.state(name))
    return {**_describe(service, name), "report": report}


@router.patch("/experiments/{name:path}")
async def change_experiment(
    name: str, change: ExperimentChange, request: Request
) -> dict[str, Any]:
    service = get_service(request)
    await service.experiments.update(name, change.weights, change.shadows)
    return _describe(service, name)


@router.post("/experiments/{name:path}/promote")
async def promote(name: str, promotion: Promotion, request: Request) -> dict[str, Any]:
    service = get_service(request)
    await service.experiments.promote(name, promotion.variant, promotion.previous_shadow_rate)
    return _describe(service, name)
