"""Static checks of the production Docker Compose file, the Dockerfile, the load balancer's
configuration (checked by the real HAProxy binary) and the settings table of docs/deploy.md.
No Docker needed."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from pydantic.fields import FieldInfo

from server.settings import Settings
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
CI_SCRIPT = ROOT / ".ci" / "run"
ENV_PREFIX = "PORTALHUB_"
HUBS = ("hub1", "hub2")
LB = "lb"
HAPROXY_CFG_IN_IMAGE = "/usr/local/etc/haproxy/haproxy.cfg"


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


def _duration_seconds(value: Any) -> float:
    """A compose duration ("90s", "1m30s") or an HAProxy one ("2s", "500ms"), in seconds."""
    total, text = 0.0, str(value)
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)?", text):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}.get(
            unit or "s", 1
        )
    return total


def _published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address ("" for every interface) of each published port."""
    published: dict[int, str] = {}
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published[int(entry["target"])] = str(entry.get("host_ip", ""))
            continue
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        published[int(parts[-1].partition("/")[0])] = host_ip
    return published


_ENV_REFERENCE = re.compile(r'"\$\{(\w+)-([^}]*)\}"|\$\{(\w+)-([^}]*)\}')


def _expand(text: str, env: dict[str, str]) -> str:
    """HAProxy's ``"${NAME-default}"`` expansion, for the words of one configuration line."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2) if match.group(1) else match.group(4)
        return env.get(name, default)

    return _ENV_REFERENCE.sub(value, text).replace('"', "")


@dataclass
class Section:
    kind: str
    name: str
    lines: list[list[str]] = field(default_factory=list)

    def keyword(self, *words: str) -> list[list[str]]:
        return [line for line in self.lines if line[: len(words)] == list(words)]


def _haproxy_sections(env: dict[str, str] | None = None) -> dict[str, Section]:
    """``kind name`` -> section, each line split in words with environment references expanded
    (their defaults unless ``env`` says otherwise) and comments dropped."""
    sections: dict[str, Section] = {}
    current: Section | None = None
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        words = _expand(line, env or {}).split()
        if not raw[0].isspace():
            current = Section(words[0], words[1] if len(words) > 1 else "")
            sections[f"{current.kind} {current.name}".strip()] = current
        else:
            assert current is not None, f"{raw!r} is outside any section"
            current.lines.append(words)
    return sections


def _backend_of(sections: dict[str, Section], frontend: Section) -> Section:
    (line,) = frontend.keyword("default_backend")
    return sections[f"backend {line[1]}"]


def _shown_default(info: FieldInfo) -> str:
    """How docs/deploy.md writes a setting's default."""
    value = info.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _documented_settings() -> dict[str, list[str]]:
    """PORTALHUB_* variable -> the cells of its row in the settings tables of docs/deploy.md."""
    rows: dict[str, list[str]] = {}
    for line in DEPLOY_DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(rf"`{ENV_PREFIX}\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


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


@pytest.fixture(scope="module", params=HUBS)
def hub(request: pytest.FixtureRequest, services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return services[request.param]


@pytest.fixture(scope="module")
def hub_env(hub: dict[str, Any]) -> dict[str, str]:
    return _environment(hub)


@pytest.fixture(scope="module")
def haproxy() -> dict[str, Section]:
    assert HAPROXY_CFG.is_file(), f"{HAPROXY_CFG} is missing"
    return _haproxy_sections()


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
    assert {"mongo", "redis", *HUBS, LB} <= services.keys()


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


def test_hub_waits_for_healthy_backends(hub: dict[str, Any]) -> None:
    depends_on = _mapping(hub.get("depends_on"), "hub.depends_on")
    for backend in ("mongo", "redis"):
        condition = _mapping(depends_on.get(backend), f"hub.depends_on.{backend}")
        assert condition.get("condition") == "service_healthy", backend


def test_hub_healthcheck_hits_readyz(hub: dict[str, Any]) -> None:
    assert "/readyz" in _healthcheck_text(hub)


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


# --- several nodes behind the load balancer -------------------------------------------------


def test_hub_nodes_share_one_definition(services: dict[str, dict[str, Any]]) -> None:
    first, *others = (services[name] for name in HUBS)
    assert first.get("image") and first.get("build")
    for other in others:
        for key in ("build", "image", "environment", "healthcheck", "volumes", "stop_grace_period"):
            assert other.get(key) == first.get(key), key


def test_first_start_is_one_node_at_a_time(services: dict[str, dict[str, Any]]) -> None:
    """The second node starts once the first is healthy: the first creates the indexes and the
    self-signed XMPP certificate on the shared volume, so that both present the same one."""
    depends_on = _mapping(services[HUBS[1]].get("depends_on"), "depends_on")
    assert _mapping(depends_on.get(HUBS[0]), HUBS[0]).get("condition") == "service_healthy"


def test_only_the_load_balancer_publishes_ports(services: dict[str, dict[str, Any]]) -> None:
    for name in (*HUBS, "mongo", "redis"):
        assert not services[name].get("ports"), f"{name} publishes ports; only {LB} should"
    published = _published(services[LB])
    assert {8080, 5222, 5223, 2525} <= published.keys()
    assert published[2525] == "127.0.0.1", "SMTP is for a mail server on this host only"


def test_load_balancer_runs_the_checked_config(services: dict[str, dict[str, Any]]) -> None:
    lb = services[LB]
    name, tag = _image_tag(str(lb.get("image", "")))
    assert name == "haproxy" and tag != "latest"
    mounts = []
    for volume in lb.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source")), str(volume.get("target"))))
        else:
            source, target, *_ = str(volume).split(":")
            mounts.append((source, target))
    assert ("./deploy/haproxy.cfg", HAPROXY_CFG_IN_IMAGE) in mounts
    assert (COMPOSE_FILE.parent / "deploy" / "haproxy.cfg").is_file()


def test_load_balancer_starts_with_the_nodes(services: dict[str, dict[str, Any]]) -> None:
    depends_on = _mapping(services[LB].get("depends_on"), f"{LB}.depends_on")
    assert set(HUBS) <= depends_on.keys()


def test_load_balancer_healthcheck_asks_haproxy_itself(
    services: dict[str, dict[str, Any]], haproxy: dict[str, Section]
) -> None:
    (monitor,) = haproxy["frontend http"].keyword("monitor-uri")
    assert monitor[1] in _healthcheck_text(services[LB])


def test_every_frontend_is_published(
    services: dict[str, dict[str, Any]], haproxy: dict[str, Section]
) -> None:
    bound = {
        int(line[1].rpartition(":")[2])
        for section in haproxy.values()
        if section.kind == "frontend"
        for line in section.keyword("bind")
    }
    assert bound == set(_published(services[LB]))


@pytest.mark.parametrize(
    ("frontend", "mode", "setting"),
    [
        ("http", "http", "http_port"),
        ("xmpp", "tcp", "xmpp_port"),
        ("xmpps", "tcp", "xmpp_tls_port"),
        ("smtp", "tcp", "smtp_port"),
    ],
)
def test_backends_reach_every_node_and_check_readiness(
    services: dict[str, dict[str, Any]],
    haproxy: dict[str, Section],
    frontend: str,
    mode: str,
    setting: str,
) -> None:
    front = haproxy[f"frontend {frontend}"]
    back = _backend_of(haproxy, front)
    assert front.keyword("mode") == back.keyword("mode") == [["mode", mode]]
    http_port = Settings.model_fields["http_port"].default
    servers = {line[1]: line[2:] for line in back.keyword("server")}
    assert set(servers) == set(HUBS)
    for name, rest in servers.items():
        host, _, port = rest[0].rpartition(":")
        assert host == name and host in services, "a server is a compose service by name"
        assert int(port) == Settings.model_fields[setting].default
        if mode == "tcp":  # the readiness check goes to the node's HTTP port
            assert rest[rest.index("port") + 1] == str(http_port)
    assert back.keyword("option", "httpchk") == [["option", "httpchk", "GET", "/readyz"]]
    assert back.keyword("http-check", "expect") == [["http-check", "expect", "status", "200"]]


def test_socketio_sessions_stick_to_their_node(haproxy: dict[str, Section]) -> None:
    back = _backend_of(haproxy, haproxy["frontend http"])
    (cookie,) = back.keyword("cookie")
    assert {"insert", "indirect", "nocache"} <= set(cookie)
    values = [line[line.index("cookie") + 1] for line in back.keyword("server")]
    assert len(set(values)) == len(HUBS), "every node has a cookie value of its own"
    defaults = haproxy["defaults"]
    assert defaults.keyword("option", "redispatch"), "a client of a node that is down moves"
    (tunnel,) = defaults.keyword("timeout", "tunnel")  # WebSocket connections after the upgrade
    assert _duration_seconds(tunnel[2]) >= 60


def test_nodes_may_start_after_the_load_balancer(haproxy: dict[str, Section]) -> None:
    (default_server,) = haproxy["defaults"].keyword("default-server")
    init_addr = default_server[default_server.index("init-addr") + 1].split(",")
    assert "none" in init_addr, "an unresolvable node must not stop HAProxy from starting"
    assert "check" in default_server
    resolvers = default_server[default_server.index("resolvers") + 1]
    assert f"resolvers {resolvers}" in haproxy


def test_drain_outlasts_the_health_checks(
    services: dict[str, dict[str, Any]], haproxy: dict[str, Section]
) -> None:
    (default_server,) = haproxy["defaults"].keyword("default-server")
    inter = _duration_seconds(default_server[default_server.index("inter") + 1])
    fall = int(default_server[default_server.index("fall") + 1])
    for name in HUBS:
        drain = float(_environment(services[name])["PORTALHUB_DRAIN_SECONDS"])
        # the balancer needs `fall` failed checks, one interval apart, to stop sending clients
        assert drain >= inter * (fall + 1), name
        # and Docker waits for the drain and for what is under way before it kills the node
        assert _duration_seconds(services[name]["stop_grace_period"]) >= drain + 30, name


def test_haproxy_accepts_the_config() -> None:
    binary = require_binary("haproxy", "haproxy")
    checked = subprocess.run(
        [binary, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    # outside compose the node names do not resolve: that, and only that, is worth a warning
    warnings = [line for line in output.splitlines() if "[WARNING]" in line or "[ALERT]" in line]
    assert all("could not resolve address 'hub" in line for line in warnings), warnings
    # with addresses that resolve, not even a warning (-dW makes warnings fatal)
    loopback = {f"HUB{n}_HOST": "127.0.0.1" for n in (1, 2)}
    strict = subprocess.run(
        [binary, "-c", "-dW", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **loopback, "HUB2_HTTP_PORT": "8081"},
    )
    assert strict.returncode == 0, strict.stdout + strict.stderr


def test_ci_installs_haproxy() -> None:
    packages = re.search(r"^PACKAGES=\((.*)\)$", CI_SCRIPT.read_text(), re.MULTILINE)
    assert packages is not None and "haproxy" in packages.group(1).split()


# --- docs/deploy.md -------------------------------------------------------------------------


def test_every_setting_is_in_the_deploy_guide() -> None:
    rows = _documented_settings()
    missing = {
        name: info
        for name, info in Settings.model_fields.items()
        if f"{ENV_PREFIX}{name.upper()}" not in rows
    }
    suggested = "\n".join(
        f"| `{ENV_PREFIX}{name.upper()}` | `{_shown_default(info)}` | {info.description or '?'} |"
        for name, info in missing.items()
    )
    assert not missing, f"docs/deploy.md has no row for these settings:\n{suggested}"


def test_the_deploy_guide_shows_real_settings_and_defaults() -> None:
    for variable, cells in _documented_settings().items():
        name = variable.removeprefix(ENV_PREFIX).lower()
        assert name in Settings.model_fields, f"{variable} in docs/deploy.md is not a setting"
        shown = f"`{_shown_default(Settings.model_fields[name])}`"
        assert cells[0].startswith(shown), f"{variable}: default is {shown}, not {cells[0]}"


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
