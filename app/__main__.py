"""CLI: `model-gateway serve | prepare-model | convert`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.backends.ctranslate2.model import QUANTIZATIONS, is_prepared
from app.settings import CONFIG_ENV, DEFAULT_MODEL_NAME, Settings, describe_error


def _load_settings(config: str | None) -> Settings:
    if config:
        os.environ[CONFIG_ENV] = config
    try:
        return Settings()
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{describe_error(exc, os.environ.get(CONFIG_ENV))}")
    except ValueError as exc:
        sys.exit(f"invalid settings: {exc}")


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import create_app

    settings = _load_settings(args.config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for variant in settings.all_variants():
        if variant.backend == "ctranslate2" and not is_prepared(variant.model_path):
            sys.exit(
                f"variant {variant.name!r}: no prepared model at {variant.model_path}; "
                "run `model-gateway prepare-model` (or `make run`, which does it)"
            )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": 10,
        "limit_concurrency": settings.max_connections,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
    else:  # each process builds its app from the same environment
        uvicorn.run("app.main:create_app_from_env", factory=True, workers=settings.workers,
                    **options)  # fmt: skip


def _prepare_model(args: argparse.Namespace) -> None:
    from app.convert.prepare import ModelPreparationError, prepare_default_model

    settings = _load_settings(args.config)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="model-gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the configured variants over HTTP")
    serve.add_argument("--config", help=f"YAML settings file (or env {CONFIG_ENV})")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=_serve)

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

    args = parser.parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
