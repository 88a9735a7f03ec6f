"""The admin API: read experiments and their report, change weights and shadows live,
promote a variant; create, list, re-limit and revoke API keys, and read their usage. Every
route needs `Authorization: Bearer <admin_token>`; without an `admin_token` in the settings
the admin API is closed. Errors are OpenAI error objects."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from app.api import get_service
from app.api.errors import documented_errors
from app.domain import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
)
from app.service import GenerationService
from app.settings import KeyLimits, KeySettings, PriorityClass
from app.tenancy.keys import KeyRing, hash_secret, new_secret
from app.tenancy.limits import Limiter


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


class KeyCreation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[\w.:@-]+$")
    models: list[str] | None = None  # null: every served model
    limits: KeyLimits = Field(default_factory=KeyLimits)
    priority: PriorityClass = "standard"


class KeyChange(BaseModel):
    """The fields given replace the key's; `limits` replaces its limits whole."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] | None = None
    limits: KeyLimits | None = None
    priority: PriorityClass | None = None
    revoked: bool | None = None


def _keys(request: Request) -> KeyRing:
    keys: KeyRing | None = request.app.state.keys
    if keys is None:
        raise InvalidRequestError("auth is off: API keys are not used (set auth in the settings)")
    return keys


def _check_models(request: Request, models: list[str] | None) -> None:
    served = get_service(request).model_names()
    unknown = sorted(set(models or ()) - set(served))
    if unknown:
        raise InvalidRequestError(
            f"no served model {', '.join(unknown)}; served: {', '.join(served)}", param="models"
        )


def _show(key: KeySettings) -> dict[str, Any]:
    return key.model_dump(exclude={"sha256"})


@router.get("/keys")
async def list_keys(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_show(k) for k in _keys(request).list()]}


@router.post("/keys", status_code=201)
async def create_key(creation: KeyCreation, request: Request) -> dict[str, Any]:
    """A new key; its secret is in this reply and nowhere else (only its SHA-256 is kept)."""
    _check_models(request, creation.models)
    secret = new_secret()
    key = KeySettings(**creation.model_dump(), sha256=hash_secret(secret))
    await _keys(request).create(key)
    return {**_show(key), "secret": secret}


@router.get("/keys/{name}")
async def key(name: str, request: Request) -> dict[str, Any]:
    return _show(_keys(request).get(name))


@router.patch("/keys/{name}")
async def change_key(name: str, change: KeyChange, request: Request) -> dict[str, Any]:
    fields = {f: getattr(change, f) for f in change.model_fields_set}
    if "models" in fields:
        _check_models(request, change.models)
    if change.limits is not None:
        fields["limits"] = change.limits.model_dump()
    return _show(await _keys(request).change(name, **fields))


@router.delete("/keys/{name}")
async def revoke_key(name: str, request: Request) -> dict[str, Any]:
    """Revoked, not forgotten: its usage stays readable, and `PATCH {"revoked": false}`
    restores it."""
    return _show(await _keys(request).change(name, revoked=True))


@router.get("/keys/{name}/usage")
async def key_usage(
    name: str, request: Request, window_s: Annotated[float, Field(gt=0, le=86_400)] = 3600
) -> dict[str, Any]:
    """Requests, tokens and refusals of the key over the last `window_s` seconds (by the
    minute; across every replica sharing Redis)."""
    _keys(request).get(name)
    limiter: Limiter = request.app.state.limiter
    return {"key": name, **await limiter.usage(name, window_s)}
