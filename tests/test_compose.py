"""Static checks of the production Docker Compose file and the Dockerfile (no Docker needed)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_PREFIX = "PORTALHUB_"


# --- helpers --------------------------------------------------------------------------------


def _mapping(value: Any, what: str) -> dict[str, Any]:
    assert isinstance(value, dict), f"{what} should be a mapping, got {type(value).__name__}"
    return {str(key): item for key, item in value.items()}


def _args(value: Any) -> list[str]:
    """A command / healthcheck test in either list or shell-string form, as a list of words."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), f"expected a string or a list, got {value!r}"
    return [str(item) for item in value]


def _image_tag(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:  # no tag at all ("mongo"), or a registry port ("host:5000/img")
        return image, "latest"
    return name, tag


def _major(tag: str) -> str:
    return tag.split(".", 1)[0].split("-", 1)[0]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (str(item).partition("=") for item in env)
        return {key: value for key, _, value in pairs}
    return {
        key: "" if value is None else str(value)
        for key, value in _mapping(env, "environment").items()
    }


def _healthcheck_text(service: dict[str, Any]) -> str:
    healthcheck = _mapping(service.get("healthcheck"), "healthcheck")
    assert not healthcheck.get("disable"), "healthcheck is disabled"
    words = _args(healthcheck.get("test"))
    assert words, "healthcheck has no test"
    assert words[0] in ("CMD", "CMD-SHELL"), f"healthcheck test should start with CMD: {words}"
    return " ".join(words[1:])


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends in a continuation line"
    return instructions


def _exec_form(args: str) -> list[str]:
    if args.startswith("["):
        parsed = json.loads(args)
        assert isinstance(parsed, list)
        return [str(item) for item in parsed]
    return shlex.split(args)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    return _mapping(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")), "compose file")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: _mapping(service, f"service {name}")
        for name, service in _mapping(compose.get("services"), "services").items()
    }


@pytest.fixture(scope="module")
def hub_env(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    return _environment(services["hub"])


@pytest.fixture(scope="module")
def replica_set(services: dict[str, dict[str, Any]]) -> str:
    command = _args(services["mongo"].get("command"))
    for index, word in enumerate(command):
        if word == "--replSet" and index + 1 < len(command):
            return command[index + 1]
        if word.startswith("--replSet="):
            return word.partition("=")[2]
    pytest.fail(f"mongo does not run as a replica set (no --replSet in {command})")


# --- docker-compose.yml ---------------------------------------------------------------------


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert {"mongo", "redis", "hub"} <= services.keys()


def test_mongo_is_mongodb_8_replica_set(
    services: dict[str, dict[str, Any]], replica_set: str
) -> None:
    name, tag = _image_tag(str(services["mongo"].get("image", "")))
    assert name == "mongo"
    assert _major(tag) == "8"
    assert replica_set


def test_mongo_healthcheck_initiates_replica_set(
    services: dict[str, dict[str, Any]], replica_set: str
) -> None:
    check = _healthcheck_text(services["mongo"])
    assert "mongosh" in check
    assert "rs.status()" in check
    assert "rs.initiate(" in check
    assert replica_set in check
    assert "mongo:27017" in check


def test_redis_is_redis_7(services: dict[str, dict[str, Any]]) -> None:
    name, tag = _image_tag(str(services["redis"].get("image", "")))
    assert name == "redis"
    assert _major(tag) == "7"
    assert "ping" in _healthcheck_text(services["redis"])


def test_hub_mongodb_url_targets_the_replica_set(
    services: dict[str, dict[str, Any]], hub_env: dict[str, str], replica_set: str
) -> None:
    url = urlsplit(hub_env["PORTALHUB_MONGODB_URL"])
    assert url.scheme == "mongodb"
    assert url.hostname == "mongo"
    assert url.hostname in services
    assert parse_qs(url.query).get("replicaSet") == [replica_set]


def test_hub_redis_url_targets_redis(
    services: dict[str, dict[str, Any]], hub_env: dict[str, str]
) -> None:
    url = urlsplit(hub_env["PORTALHUB_REDIS_URL"])
    assert url.scheme in ("redis", "rediss")
    assert url.hostname == "redis"
    assert url.hostname in services


def test_hub_waits_for_healthy_backends(services: dict[str, dict[str, Any]]) -> None:
    depends_on = _mapping(services["hub"].get("depends_on"), "hub.depends_on")
    for backend in ("mongo", "redis"):
        condition = _mapping(depends_on.get(backend), f"hub.depends_on.{backend}")
        assert condition.get("condition") == "service_healthy", backend


def test_hub_healthcheck_hits_readyz(services: dict[str, dict[str, Any]]) -> None:
    assert "/readyz" in _healthcheck_text(services["hub"])


def test_hub_environment_names_settings_fields(hub_env: dict[str, str]) -> None:
    names = [key for key in hub_env if key.startswith(ENV_PREFIX)]
    assert names, "hub sets no PORTALHUB_* variables"
    unknown = [
        key for key in names if key.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    ]
    assert not unknown, f"not fields of server.settings.Settings: {unknown}"


def test_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(_mapping(compose.get("volumes") or {}, "volumes"))
    used: set[str] = set()
    for service in services.values():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                if volume.get("type", "volume") == "volume" and volume.get("source"):
                    used.add(str(volume["source"]))
                continue
            source, sep, _ = str(volume).partition(":")
            if sep and not source.startswith(("/", ".", "~", "$")):
                used.add(source)
    assert used, "no named volumes used"
    assert used <= declared, f"undeclared volumes: {sorted(used - declared)}"


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_runs_portalhub_serve() -> None:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    commands = [args for keyword, args in _dockerfile_instructions() if keyword == "CMD"]
    assert commands, "Dockerfile has no CMD"
    assert _exec_form(commands[-1]) == ["portalhub", "serve"]


def test_dockerfile_installs_from_lock_file() -> None:
    instructions = _dockerfile_instructions()
    copies = [args for keyword, args in instructions if keyword == "COPY"]
    assert any("requirements.lock" in args.split() for args in copies)
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert any("pip install" in args and "-r requirements.lock" in args for args in runs)


def test_dockerfile_environment_names_settings_fields() -> None:
    names: list[str] = []
    for keyword, args in _dockerfile_instructions():
        if keyword == "ENV":
            names += [word.partition("=")[0] for word in shlex.split(args) if "=" in word]
    unknown = [
        key
        for key in names
        if key.startswith(ENV_PREFIX)
        and key.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    ]
    assert not unknown, f"not fields of server.settings.Settings: {unknown}"
