"""API keys: who may generate, which models, under which limits and priority.

Keys start from the config (`keys:`, each with the SHA-256 of its secret); the admin API
creates, re-limits and revokes them. With Redis, every change is stored there and reaches
every gateway replica (`RedisShared`: within `experiment_sync_interval_s`); a stored record
wins over the config's for its name. Without Redis, changes are process-local.

A presented secret is hashed and looked up by its digest. The lookup's timing can only tell
an attacker about the digest of their own guess, which says nothing about any real secret;
the match is then confirmed with a constant-time comparison.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Iterable

import redis.asyncio as redis
from pydantic import ValidationError

from app.domain import (
    PRIORITY_CLASSES,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    Tenant,
)
from app.settings import KeySettings
from app.shared_state import RedisShared

logger = logging.getLogger(__name__)

_KEYS = "model-gateway:v1:keys"
_VERSION = "model-gateway:v1:keys-version"
SECRET_PREFIX = "mg-"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def tenant_of(key: KeySettings) -> Tenant:
    limits = key.limits
    return Tenant(
        name=key.name,
        models=None if key.models is None else frozenset(key.models),
        priority=PRIORITY_CLASSES.index(key.priority),
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        max_concurrent=limits.max_concurrent,
        daily_tokens=limits.daily_tokens,
    )


# What a replica reads: the version counter, and the stored keys by name.
_Stored = tuple[bytes | str | None, dict[bytes | str, bytes | str]]


class KeyRing(RedisShared[_Stored]):
    def __init__(
        self, configured: Iterable[KeySettings], redis_url: str | None, sync_interval_s: float
    ) -> None:
        super().__init__(redis_url, sync_interval_s, "API key")
        self._configured = {k.name: k for k in configured}
        self._keys: dict[str, KeySettings] = {}
        self._by_digest: dict[str, tuple[KeySettings, Tenant]] = {}
        self._install(self._configured)
        self._version: bytes | str | None = None

    def authenticate(self, secret: str) -> Tenant:
        digest = hash_secret(secret)
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry[0].sha256, digest):
            raise AuthenticationError("Incorrect API key provided")
        if entry[0].revoked:
            raise AuthenticationError(f"the API key {entry[0].name!r} has been revoked")
        return entry[1]

    def list(self) -> list[KeySettings]:
        return list(self._keys.values())

    def get(self, name: str) -> KeySettings:
        try:
            return self._keys[name]
        except KeyError:
            raise NotFoundError(f"no key {name!r}") from None

    async def create(self, key: KeySettings) -> KeySettings:
        if key.name in self._keys:
            raise InvalidRequestError(f"a key named {key.name!r} exists", param="name")
        if any(k.sha256 == key.sha256 for k in self._keys.values()):
            raise InvalidRequestError("another key has this secret", param="sha256")
        return await self._store(key)

    async def change(self, name: str, **fields: object) -> KeySettings:
        """New values for some of the key's fields (models, limits, priority, revoked)."""
        current = self.get(name)
        try:
            key = KeySettings.model_validate(current.model_dump() | fields)
        except ValidationError as exc:
            raise InvalidRequestError(str(exc.errors()[0]["msg"])) from exc
        return await self._store(key)

    async def _store(self, key: KeySettings) -> KeySettings:
        if self._redis is not None:
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hset(_KEYS, key.name, key.model_dump_json())
                    pipe.incr(_VERSION)
                    await pipe.execute()
            except redis.RedisError as exc:
                raise NotReadyError(f"could not store the key in Redis: {exc}") from exc
        self._install(self._keys | {key.name: key})
        logger.info("key %s: %s", key.name, key.model_dump(exclude={"sha256"}))
        return key

    def _install(self, keys: dict[str, KeySettings]) -> None:
        self._keys = dict(keys)
        self._by_digest = {k.sha256: (k, tenant_of(k)) for k in keys.values()}

    async def _read(self, client: redis.Redis) -> _Stored | None:
        version = await client.get(_VERSION)
        if version == self._version:
            return None
        return version, await client.hgetall(_KEYS)

    def _take(self, stored: _Stored) -> None:
        """The config's keys, and over them the stored ones (a record that is not a valid
        key is skipped and logged)."""
        version, records = stored
        keys = dict(self._configured)
        for name, value in records.items():
            try:
                key = KeySettings.model_validate(json.loads(value))
            except (ValueError, ValidationError) as exc:
                logger.warning("ignoring the stored key %r: %s", name, exc)
                continue
            keys[key.name] = key
        self._install(keys)
        self._version = version
