"""Secrets cut out of log text: the second line of defence behind the logger levels.

The first line is that nothing logs a secret: the hub's own lines name ids, never bodies,
passwords or tokens, and the third-party loggers that echo what passes through them are held
above their chatty levels (``server/observability/logs.py``). This catches what slips past:
an exception message quoting a document, a library's log line naming a URL with credentials.
It cannot recognise a message body by its look, only by the key it is written under.
"""

from __future__ import annotations

import re

MASK = "***"

# Keys whose values are secrets or someone's text, in ``key: value`` / ``key=value`` form,
# quoted or not, and inside JSON that sits inside JSON (``\"password\": \"...\"``).
_SECRET_KEYS = (
    "password",
    "password_hash",
    "passwd",
    "secret",
    "token",
    "token_hash",
    "access_token",
    "refresh_token",
    "metrics_token",
    "authorization",
    "api_key",
    "salt",
    "stored_key",
    "server_key",
    "text",
    "body",
    "html",
)
_KEY_VALUE = re.compile(
    r"(?P<key>\b(?:" + "|".join(_SECRET_KEYS) + r")\b\\?[\"']?\s*[:=]\s*)(?P<value>"
    # a JSON string inside a JSON string: \"...\" with \\\" and \\\\ inside
    r'\\"(?:\\\\(?:\\\\|\\"|[^\\])|\\[^\\"]|[^\\"])*\\"'
    r'|"(?:\\.|[^"\\])*"'  # a JSON string
    r"|'(?:\\.|[^'\\])*'"  # a Python repr
    r"|[^\s,;&}\])]+)",  # key=value
    re.IGNORECASE,
)
_ARGON2 = re.compile(r"\$argon2(?:id|i|d)\$[A-Za-z0-9$=,+/.-]+")
_BEARER = re.compile(r"\b(bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"\b([a-z][a-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+@", re.IGNORECASE)


def _mask_value(match: re.Match[str]) -> str:
    value = match["value"]
    if value.startswith('\\"'):
        return f'{match["key"]}\\"{MASK}\\"'
    if value[:1] in "\"'":
        return f"{match['key']}{value[0]}{MASK}{value[0]}"
    return f"{match['key']}{MASK}"


def redact(text: str) -> str:
    """``text`` with secrets and texts under telling keys replaced by ``***``."""
    text = _ARGON2.sub("$argon2id$" + MASK, text)
    text = _BEARER.sub(r"\g<1>" + MASK, text)
    text = _URL_CREDENTIALS.sub(r"\g<1>" + MASK + "@", text)
    return _KEY_VALUE.sub(_mask_value, text)
