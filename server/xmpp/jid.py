"""Jabber IDs (RFC 7622), in the subset a company server needs: portal logins as localparts."""

from __future__ import annotations

from dataclasses import dataclass

MAX_PART = 1023


class InvalidJid(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Jid:
    local: str
    domain: str
    resource: str = ""

    @classmethod
    def parse(cls, text: str) -> Jid:
        if not text or len(text) > 3 * MAX_PART:
            raise InvalidJid(text)
        bare, _, resource = text.partition("/")
        local, at, domain = bare.rpartition("@")
        if not at:
            local, domain = "", bare
        if not domain or (at and not local) or any(len(p) > MAX_PART for p in (local, resource)):
            raise InvalidJid(text)
        if any(c in local for c in "\"&'/:<>@ ") or any(ord(c) < 32 for c in text):
            raise InvalidJid(text)
        return cls(local.lower(), domain.lower().rstrip("."), resource)

    @property
    def bare(self) -> Jid:
        return Jid(self.local, self.domain)

    def with_resource(self, resource: str) -> Jid:
        return Jid(self.local, self.domain, resource)

    def __str__(self) -> str:
        text = f"{self.local}@{self.domain}" if self.local else self.domain
        return f"{text}/{self.resource}" if self.resource else text
