"""CLI: `model-gateway serve | ready | prepare-model | convert | quantize | eval | keys create`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.backends.ctranslate2.model import QUANTIZATIONS, is_prepared
from app.domain import PRIORITY_CLASSES
from app.settings import CONFIG_ENV, DEFAULT_MODEL_NAME, Settings, describe_error


def _load_settings(config: str | None, **overrides: Any) -> Settings:
    """The settings; `overrides` (the command line's) win over the file and environment."""
    if config:
        os.environ[CONFIG_ENV] = config
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{describe_error(exc, os.environ.get(CONFIG_ENV))}")
    except ValueError as exc:
        sys.exit(f"invalid settings: {exc}")


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import create_app

    given = (("host", args.host), ("port", args.port), ("auth", args.auth))
    settings = _load_settings(args.config, **{k: v for k, v in given if v is not None})
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for variant in settings.all_variants():
        if variant.backend == "ctranslate2" and not is_prepared(variant.model_path):
            sys.exit(
                f"variant {variant.name!r}: no prepared model at {variant.model_path}; "
                "run `model-gateway prepare-model` (or `make run`, which does it)"
            )
    _log_auth(settings)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        "limit_concurrency": settings.max_connections,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
    else:  # each process builds its app from the same environment
        for name, value in given:
            if value is not None:
                os.environ[f"MODEL_GATEWAY_{name.upper()}"] = str(value)
        uvicorn.run("app.main:create_app_from_env", factory=True, workers=settings.workers,
                    **options)  # fmt: skip


def _ready(args: argparse.Namespace) -> None:
    """Exit 0 if the server of these settings, on this machine, is ready (a container's
    health check: the port is the one its config says)."""
    import urllib.error
    import urllib.request

    settings = _load_settings(args.config)
    url = f"http://127.0.0.1:{settings.port}/ready"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as reply:
            sys.exit(0 if reply.status == 200 else 1)
    except (urllib.error.URLError, OSError) as exc:
        sys.exit(f"not ready: {url}: {exc}")


def _log_auth(settings: Settings) -> None:
    """Say whether the door is open: loudly where others can reach it."""
    log = logging.getLogger("app")
    where = f"{settings.host}:{settings.port}"
    if settings.auth == "off":
        try:
            loopback = (
                settings.host == "localhost" or ipaddress.ip_address(settings.host).is_loopback
            )
        except ValueError:
            loopback = False
        if loopback:
            log.warning("auth is off: the door is open to anyone on this machine (%s)", where)
        else:
            log.warning(
                "AUTH IS OFF on %s, which other machines can reach: anyone who can reach it "
                "can generate without limit. Set auth: required and add keys "
                "(`model-gateway keys create NAME`).", where
            )  # fmt: skip
    elif settings.auth == "optional":
        log.info("auth is optional: calls without an API key are served, without limits")
    else:
        log.info("auth is required: %d API key(s) configured", len(settings.keys))


def _prepare_model(args: argparse.Namespace) -> None:
    from app.convert.prepare import ModelPreparationError, prepare_default_model

    # It serves nothing: the serving settings' own demands (API keys) do not apply.
    settings = _load_settings(args.config, auth="off")
    model_dir: Path = args.model_dir or settings.model_dir
    try:
        prepare_default_model(
            model_dir / DEFAULT_MODEL_NAME, model_dir / ".cache", quantization=args.quantization
        )
    except ModelPreparationError as exc:
        sys.exit(f"error: {exc}")


def _convert(args: argparse.Namespace) -> None:
    from app.convert.prepare import ModelPreparationError, convert

    try:
        convert(Path(args.src), Path(args.out), args.quantization)
    except ModelPreparationError as exc:
        sys.exit(f"error: {exc}")


def _quantize(args: argparse.Namespace) -> None:
    from app.convert.prepare import ModelPreparationError, default_hf_checkpoint
    from app.convert.quantize import quantize, stages

    try:
        if args.src:
            src = Path(args.src)
        else:
            src = default_hf_checkpoint(
                _load_settings(args.config, auth="off").model_dir / ".cache"
            )
        chosen = stages(args.ctranslate2, args.vllm)
        failures = quantize(src, Path(args.out), chosen)
    except ModelPreparationError as exc:
        sys.exit(f"error: {exc}")
    if failures:
        sys.exit("failed: " + "; ".join(f"{f.stage}: {f.why}" for f in failures))


def _eval(args: argparse.Namespace) -> None:
    import asyncio

    from app.convert.evaluate import EvalError, Target, evaluate, markdown, write_report

    try:
        targets = [Target.parse(spec) for spec in args.targets]
        results = asyncio.run(evaluate(targets, args.reference, speed=not args.no_speed))
    except EvalError as exc:
        sys.exit(f"error: {exc}")
    reference = args.reference or targets[0].name
    print(markdown(results, reference), end="")
    for path in write_report(results, reference, Path(args.out)):
        print(f"wrote {path}")


def _create_key(args: argparse.Namespace) -> None:
    import yaml

    from app.settings import KeyLimits, KeySettings
    from app.tenancy.keys import hash_secret, new_secret

    secret = new_secret()
    try:
        key = KeySettings(
            name=args.name,
            sha256=hash_secret(secret),
            models=args.models.split(",") if args.models else None,
            limits=KeyLimits(
                requests_per_minute=args.rpm,
                tokens_per_minute=args.tpm,
                max_concurrent=args.max_concurrent,
                daily_tokens=args.daily_tokens,
            ),
            priority=args.priority,
        )
    except ValidationError as exc:
        sys.exit(f"invalid key:\n{describe_error(exc, None)}")
    entry = key.model_dump(exclude_none=True, exclude_defaults=True) | {"sha256": key.sha256}
    print(f"secret (shown once; only its SHA-256 is kept): {secret}")
    print("\nadd to the `keys:` of the gateway's config:")
    print(yaml.safe_dump({"keys": [entry]}, sort_keys=False), end="")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="model-gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the configured variants over HTTP")
    serve.add_argument("--config", help=f"YAML settings file (or env {CONFIG_ENV})")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--auth", choices=("required", "optional", "off"))
    serve.set_defaults(run=_serve)

    ready = commands.add_parser("ready", help="exit 0 if the local server is ready")
    ready.add_argument("--config", help=f"YAML settings file (or env {CONFIG_ENV})")
    ready.add_argument("--timeout", type=float, default=2.0)
    ready.set_defaults(run=_ready)

    prepare = commands.add_parser(
        "prepare-model", help=f"build the default model ({DEFAULT_MODEL_NAME}) if not built"
    )
    prepare.add_argument("--config", help=f"YAML settings file (or env {CONFIG_ENV})")
    prepare.add_argument("--model-dir", type=Path, help="default: the model_dir setting")
    prepare.add_argument("--quantization", choices=QUANTIZATIONS, default="int8")
    prepare.set_defaults(run=_prepare_model)

    conv = commands.add_parser("convert", help="convert an HF checkpoint or GGUF file")
    conv.add_argument("src", help="HF checkpoint directory or .gguf file")
    conv.add_argument("out", help="output directory")
    conv.add_argument("--quantization", choices=QUANTIZATIONS, default="int8")
    conv.set_defaults(run=_convert)

    quant = commands.add_parser(
        "quantize", help="CTranslate2 and vLLM variants of an HF checkpoint, one folder each"
    )
    quant.add_argument("out", help="output folder")
    quant.add_argument("--src", help="HF checkpoint directory (default: the default model's)")
    quant.add_argument("--config", help=f"YAML settings file (or env {CONFIG_ENV})")
    quant.add_argument(
        "--ctranslate2", type=_names, metavar="TYPES",
        help=f"CTranslate2 types, comma-separated, of {','.join(QUANTIZATIONS)} (default: "
        "those this machine can load; '' for none)",
    )  # fmt: skip
    quant.add_argument(
        "--vllm", type=_names, default=[], metavar="SCHEMES",
        help="llmcompressor schemes for vLLM, comma-separated (default none; README)",
    )  # fmt: skip
    quant.set_defaults(run=_quantize)

    evaluation = commands.add_parser(
        "eval", help="quality, speed and cost of OpenAI-compatible endpoints, side by side"
    )
    evaluation.add_argument(
        "targets", nargs="+", metavar="NAME=URL[,model=M][,path=DIR][,key=KEY]",
        help="an endpoint serving one model (the model defaults to NAME; path: its local "
        "model directory, for size and perplexity)",
    )  # fmt: skip
    evaluation.add_argument("--reference", help="the target others are compared to (the first)")
    evaluation.add_argument("--out", default="eval-report", help="folder of the report")
    evaluation.add_argument("--no-speed", action="store_true", help="quality only")
    evaluation.set_defaults(run=_eval)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="make a key: print its secret once, and its config")
    create.add_argument("name")
    create.add_argument("--models", help="comma-separated served model names (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute (prompt + completion)")
    create.add_argument("--max-concurrent", type=int, help="requests at once")
    create.add_argument("--daily-tokens", type=int, help="tokens per UTC day")
    create.add_argument("--priority", choices=PRIORITY_CLASSES, default="standard")
    create.set_defaults(run=_create_key)

    args = parser.parse_args(argv)
    if args.command not in ("serve", "keys", "ready"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
