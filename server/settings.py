"""One settings object, read from PORTALHUB_* environment variables and an optional TOML file."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "PORTALHUB_CONFIG"
DEFAULT_DRAIN_SECONDS = 10.0
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ConfigFileError(ValueError):
    """The file named by PORTALHUB_CONFIG is missing or is not valid TOML."""


class Settings(BaseSettings):
    """Effective configuration. Environment beats the TOML file, which beats the defaults."""

    model_config = SettingsConfigDict(env_prefix="PORTALHUB_", extra="forbid")

    host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    domain: str = "localhost"
    default_time_zone: str = Field(
        default="UTC", description="For users who have not set theirs (CRM days, midnight)"
    )
    data_dir: Path = Path("var")
    db_dir: Path | None = Field(
        default=None, description="Embedded database files; defaults to <data_dir>/db"
    )
    mongodb_url: SecretStr | None = None
    mongodb_database: str = "portalhub"
    mongodb_socket_timeout_ms: int = Field(
        default=20_000,
        ge=1000,
        description="A database round trip slower than this fails (503 over REST) "
        "instead of hanging the request",
    )
    disk_reserve_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="Embedded database: new writes are refused (REST 507, SMTP 452) while "
        "its disk has less free space than this (WiredTiger panics on a full disk)",
    )
    disk_reserve_percent: float = Field(
        default=0.0,
        ge=0,
        le=50,
        description="Embedded database: a reserve as a share of the disk's size; the larger "
        "of the two reserves applies",
    )
    redis_url: SecretStr | None = None
    drain_seconds: float | None = Field(
        default=None,
        ge=0,
        description="On SIGTERM, how long /readyz answers 503 'draining' (so that a load "
        "balancer stops sending new clients) before the node stops accepting and tells its "
        "clients to reconnect elsewhere; default 10 with Redis (several nodes), else 0",
    )
    token_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=1)
    event_retention_seconds: int = Field(default=3 * 24 * 3600, ge=1)
    cache_ttl_seconds: float = Field(
        default=10.0,
        gt=0,
        description="In-process copies of tokens, users, the directory, chats and memberships "
        "are corrected through the event bus at once; this is the backstop for an event lost "
        "(e.g. while Redis was unreachable)",
    )
    cache_stale_seconds: float = Field(
        default=10.0,
        ge=0,
        description="An in-process copy past its time to live is still served for this long "
        "while one background read refreshes it, so that the backstop puts no database read "
        "in series with a connect or a request; an invalidation still acts at once, and a lost "
        "one lasts at most the time to live plus this; 0 reads in series as before",
    )
    cache_max_entries: int = Field(
        default=100_000, ge=100, description="Entries per in-process cache (least recent go)"
    )
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    http_header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A request's line and headers must have arrived this long after the "
        "connection opened or the previous answer on it was sent; idle keep-alive "
        "connections are closed after it too",
    )
    http_body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A request body must have arrived this long after the request's headers "
        "(a large upload gets more time for every byte that has come)",
    )
    http_max_connections_per_address: int = Field(
        default=200,
        ge=0,
        description="Open HTTP connections (Socket.IO included) from one client address, "
        "an IPv6 /64 counting as one; 0: no cap (behind a proxy, which limits per client)",
    )
    login_max_failures: int = Field(default=10, ge=1)
    login_lockout_seconds: int = Field(default=300, ge=1)
    login_address_max_failures: int = Field(
        default=50,
        ge=1,
        description="Failed logins from one client address within login_lockout_seconds "
        "before that address is locked for as long (any login; successes do not clear it)",
    )
    login_hash_workers: int | None = Field(
        default=None, ge=1, description="Password checks run at once; default one per CPU"
    )
    login_queue: int = Field(
        default=64,
        ge=0,
        description="Logins that may wait for a password check, in all; more answer 503",
    )
    login_address_queue: int = Field(
        default=8,
        ge=0,
        description="Logins of one client address that may wait for a password check; more "
        "answer 429",
    )
    trusted_proxies: str = Field(
        default="127.0.0.1,::1",
        description="Comma-separated addresses or networks of proxies whose X-Forwarded-For "
        "names the client (for the per-address login limits); their own connections count "
        "as no address",
    )
    socket_max_message_bytes: int = Field(default=64 * 1024, ge=1024)
    socket_events_per_second: float = Field(default=20.0, gt=0)
    socket_event_burst: int = Field(default=40, ge=1)
    socket_max_connections_per_user: int = Field(
        default=20, ge=1, description="Socket.IO connections of one user on a node"
    )
    socket_send_backlog_bytes: int = Field(
        default=1024 * 1024,
        ge=64 * 1024,
        description="Bytes that may wait for one Socket.IO websocket client beyond what its "
        "connection buffers; a client further behind (it does not read) is disconnected and "
        "catches up when it reconnects",
    )
    socket_auth_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="An Engine.IO connection with no authenticated Socket.IO connection "
        "this long after opening is closed",
    )
    presence_grace_seconds: float = Field(default=5.0, ge=0)
    presence_heartbeat_timeout_seconds: float = Field(default=140.0, gt=0)
    im_max_message_chars: int = Field(default=10_000, ge=1)
    im_messages_per_second: float = Field(default=5.0, gt=0)
    im_message_burst: int = Field(default=20, ge=1)
    im_max_recipients: int = Field(default=500, ge=1)
    file_max_bytes: int = Field(
        default=25 * 1024 * 1024,
        ge=1,
        le=2**40,
        description="Largest file that may be sent in a chat (web upload and XEP-0363 slots)",
    )
    file_max_per_message: int = Field(default=10, ge=1, le=100)
    public_url: str | None = Field(
        default=None,
        description="The hub's address as users reach it (https://chat.example.com), for "
        "the file links given to Jabber clients; default http://<domain>:<http_port>",
    )
    task_creates_per_second: float = Field(
        default=1.0, gt=0, description="Task creation requests a user may make per second"
    )
    task_create_burst: int = Field(default=30, ge=1)
    xmpp_enabled: bool = True
    xmpp_host: str | None = Field(default=None, description="Defaults to host")
    xmpp_port: int = Field(default=5222, ge=0, le=65535, description="STARTTLS listener")
    xmpp_tls_port: int = Field(default=5223, ge=0, le=65535, description="Direct TLS listener")
    xmpp_allow_plaintext: bool = Field(
        default=False, description="Allow streams without TLS (tests on loopback only)"
    )
    xmpp_public_host: str | None = Field(
        default=None, description="Host name Jabber clients connect to; defaults to the domain"
    )
    xmpp_cert_file: Path | None = None
    xmpp_key_file: Path | None = None
    xmpp_max_stanza_bytes: int = Field(default=256 * 1024, ge=4096)
    xmpp_auth_timeout_seconds: float = Field(default=30.0, gt=0)
    # Silence right after the TLS handshake is a person reading a certificate prompt (Pidgin,
    # Profanity, mcabber ask before going on): the login timeout waits for them this long.
    xmpp_tls_prompt_seconds: float = Field(default=300.0, gt=0)
    xmpp_read_bytes_per_second: float = Field(default=32 * 1024, gt=0)
    xmpp_read_burst_bytes: int = Field(default=512 * 1024, ge=16 * 1024)
    xmpp_max_sessions_per_user: int = Field(default=10, ge=1)
    xmpp_max_stanzas_in_flight: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="Stanzas of one XMPP session read but not yet finished (stored); past "
        "this the session stops reading until some finish",
    )
    xmpp_max_connections: int = Field(default=5000, ge=1)
    xmpp_ping_interval_seconds: float = Field(default=60.0, gt=0)
    xmpp_ping_timeout_seconds: float = Field(default=30.0, gt=0)
    xmpp_resume_seconds: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        description="XEP-0198: how long a session whose connection dropped is held for the "
        "client to resume it (its stanzas queued, its presence kept); 0: acks only, no "
        "resumption",
    )
    crm_counters_check_minutes: int = Field(
        default=360,
        ge=0,
        description="The CRM counters are kept by differences; every this many minutes a "
        "background check recounts each user's numbers (a few users at a time) and repairs "
        "any that drifted. 0: off (portalhub counters check still works)",
    )
    crm_inbox: str | None = Field(
        default=None, description="The CRM's mail address; defaults to crm@<domain>"
    )
    smtp_relay_url: SecretStr | None = Field(
        default=None,
        description="Outgoing mail relay, e.g. smtp://user:pass@host:587 (STARTTLS) or "
        "smtps://host:465; unset: mail stays in the outbox",
    )
    smtp_enabled: bool = Field(default=True, description="Run the SMTP ingress listener")
    smtp_host: str | None = Field(default=None, description="Defaults to host")
    smtp_port: int = Field(default=2525, ge=0, le=65535, description="SMTP ingress listener")
    lmtp_port: int | None = Field(
        default=None, ge=0, le=65535, description="LMTP listener (for a local MTA); off if unset"
    )
    smtp_cert_file: Path | None = None
    smtp_key_file: Path | None = None
    mail_max_message_bytes: int = Field(default=25 * 1024 * 1024, ge=64 * 1024)
    mail_max_recipients: int = Field(default=50, ge=1)
    mail_spool_dir: Path | None = Field(
        default=None,
        description="Where the SMTP/LMTP listener keeps accepted mail until the database has "
        "it (persistent storage, this node's own); defaults to <data_dir>/mail-spool",
    )
    mail_spool_max_bytes: int = Field(
        default=1 << 30,
        ge=1 << 20,
        description="Accepted mail waiting for the database, at most; past it the listener "
        "answers 452 and the sending servers retry later",
    )
    mail_retention_days: int = Field(
        default=30,
        ge=1,
        description="Raw bytes of processed incoming mail and copies of sent mail are dropped "
        "after this many days (the activities keep the text, HTML and attachments)",
    )
    mail_trusted_authserv_ids: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="The authserv-ids (RFC 8601) of the mail server in front, comma-separated: "
        "its Authentication-Results fields decide whether a sender failed SPF/DKIM/DMARC "
        "(then not matched by its address alone, and flagged); unset: not checked",
    )
    web_client_dir: Path | None = None
    log_level: LogLevel = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text: one readable line per record; json: one JSON object per line "
        "(ts, level, logger, msg, node, request_id, event_id, exc_info)",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token that GET /metrics requires; unset: /metrics answers "
        "loopback only",
    )
    node_heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often a node writes its entry in the node registry"
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        for spec in value.split(","):
            if spec.strip():
                ipaddress.ip_network(spec.strip(), strict=False)  # ValueError names the bad one
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("mail_trusted_authserv_ids", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):  # the environment: "mx1.example.com, mx2.example.com"
            value = value.split(",")
        if isinstance(value, list):
            return [str(v).strip().lower() for v in value if str(v).strip()]
        return value

    @model_validator(mode="after")
    def _certificate_pair(self) -> Settings:
        if (self.xmpp_cert_file is None) != (self.xmpp_key_file is None):
            raise ValueError("set both xmpp_cert_file and xmpp_key_file, or neither")
        if (self.smtp_cert_file is None) != (self.smtp_key_file is None):
            raise ValueError("set both smtp_cert_file and smtp_key_file, or neither")
        return self

    @property
    def crm_inbox_address(self) -> str:
        return (self.crm_inbox or f"crm@{self.domain}").lower()

    @property
    def drain_grace_seconds(self) -> float:
        if self.drain_seconds is not None:
            return self.drain_seconds
        return DEFAULT_DRAIN_SECONDS if self.redis_url is not None else 0.0

    @property
    def embedded_db_dir(self) -> Path:
        return self.db_dir if self.db_dir is not None else self.data_dir / "db"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            # A file named but not there would otherwise be skipped without a word.
            if not path.is_file():
                raise ConfigFileError(f"{CONFIG_FILE_ENV}={config_file}: no such file")
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigFileError(f"{CONFIG_FILE_ENV}={config_file}: {exc}") from None
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with secrets (and credentials inside URLs) hidden."""
        shown: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                shown[name] = "********" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                shown[name] = str(value)
            else:
                shown[name] = value
        return shown


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per invalid setting, naming its variable; secret values are never echoed."""
    lines: list[str] = []
    fields = Settings.model_fields
    for error in exc.errors(include_url=False):
        msg = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:  # a rule across settings
            lines.append(f"invalid configuration: {msg}")
            continue
        name = str(error["loc"][0])
        if name not in fields:
            lines.append(f"unknown setting {name!r} (in the {CONFIG_FILE_ENV} file)")
            continue
        line = f"invalid setting PORTALHUB_{name.upper()}: {msg}"
        if fields[name].annotation not in (SecretStr, SecretStr | None):
            shown = repr(error.get("input"))
            line += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
        lines.append(line)
    return lines
