"""Reply codes: the short signed token a CRM mail carries so that its replies find their way
back to the record it was sent from. Pure, no I/O.

A code names the outgoing email activity and the type of its record; the activity knows its
record, so the record's id need not travel, and the code stays short enough for a subject
line. It is signed with HMAC-SHA256 under a server secret and carries the id of that secret,
so secrets can be rotated: a reply to mail sent before a rotation still verifies while the
old key is kept.

Layout, before encoding (180 bits, 36 base32 characters, after one key-id character)::

    record type (4 bits) | activity id (96 bits) | HMAC-SHA256 truncated (80 bits)

Codes are written in Crockford's base32: case-insensitive, without I, L, O and U, and read
back forgivingly (i and l as 1, o as 0), because people retype them and mail clients change
case. In text a code appears as ``[CRM-<code>]``; in a Reply-To as ``crm+<code>@domain``.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""Crockford's base32 symbols, in value order."""

# Frozen forever: a record type's number is inside every code already sent.
_TYPE_NUMBERS: Mapping[str, int] = {"lead": 0, "contact": 1, "company": 2, "deal": 3}
_TYPE_NAMES: Mapping[int, str] = {number: name for name, number in _TYPE_NUMBERS.items()}

_ID_BITS = 96
# 80 bits: guessing a code is an online attack against our inbox, and 2**80 tries is out of
# reach; every further byte would cost subject-line space for nothing.
_MAC_BITS = 80
_BODY_CHARS = 36  # (4 + 96 + 80) / 5
CODE_LENGTH = 1 + _BODY_CHARS
"""Characters in a code: the key id, then the body."""

MIN_SECRET_BYTES = 16

# Binds a MAC to this use and this layout, so a secret shared with something else by mistake
# (or a future layout) cannot produce a MAC that verifies here.
_DOMAIN = b"portalhub/mailbridge/reply-code/v1\x00"

_DECODE: Mapping[str, int] = {
    **{ch: value for value, ch in enumerate(ALPHABET)},
    **{ch.lower(): value for value, ch in enumerate(ALPHABET)},
    "I": 1,
    "i": 1,
    "L": 1,
    "l": 1,
    "O": 0,
    "o": 0,
}

_HEX24 = re.compile(r"[0-9a-f]{24}")

# Candidates only: whatever this finds is verified before it is believed, so it may be generous
# (any case, the ambiguous letters, a dash that a word processor turned into another dash).
_SYMBOL = "[0-9A-TV-Z]"  # with IGNORECASE: the alphabet, both cases, and I, L, O; never U
_DASHES = "-\u2010\u2011\u2012\u2013\u2014_ "
_IN_TEXT = re.compile(
    rf"(?<![0-9A-Z])CRM[{_DASHES}]?({_SYMBOL}{{{CODE_LENGTH}}})(?![0-9A-Z])", re.IGNORECASE
)
_TAG = re.compile(r"<[^<>]*>")
# A line break with the quote markers and spaces around it: a client that wraps a quoted
# subject line ("> Subject: Your quote [CRM-06TR4PB4K90J62SAW2K" / "> MDCZ8RB66YX30Y4J7S]")
# cuts a code in two, and only the text without them joins it again.
_BREAK = re.compile(r"[ \t]*\r?\n[ \t>]*")


@dataclass(frozen=True, slots=True)
class CodeRef:
    """What a code names: an outgoing email activity (24-hex ObjectId) of a record type."""

    record_type: str
    activity_id: str

    def __post_init__(self) -> None:
        if self.record_type not in _TYPE_NUMBERS:
            raise ValueError(f"reply code: unknown record type {self.record_type!r}")
        if not _HEX24.fullmatch(self.activity_id):
            raise ValueError(f"reply code: {self.activity_id!r} is not a 24-hex ObjectId")


def normal_key_id(key_id: str) -> str:
    """A key id as stored: one upper-case Crockford symbol. Raises ``ValueError`` otherwise."""
    if len(key_id) != 1 or key_id not in _DECODE:
        raise ValueError(f"reply code: key id {key_id!r} is not one Crockford base32 symbol")
    return ALPHABET[_DECODE[key_id]]


def normalise(token: str) -> str | None:
    """The canonical spelling of a code (upper case, i/l as 1, o as 0), or None when it cannot
    be one: wrong length or a character outside the alphabet."""
    token = token.strip()
    if len(token) != CODE_LENGTH:
        return None
    out = []
    for ch in token:
        value = _DECODE.get(ch)
        if value is None:
            return None
        out.append(ALPHABET[value])
    return "".join(out)


def _mac(secret: bytes, key_id: str, body: int) -> int:
    message = _DOMAIN + key_id.encode("ascii") + body.to_bytes(13, "big")
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return int.from_bytes(digest[: _MAC_BITS // 8], "big")


def _check_secret(secret: bytes) -> None:
    # A configuration mistake, not a hostile input: say so loudly rather than sign weakly.
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"reply code: a secret needs at least {MIN_SECRET_BYTES} bytes")


def issue(ref: CodeRef, key_id: str, secret: bytes) -> str:
    """The code for ``ref``, signed with ``secret`` under ``key_id`` (one Crockford symbol)."""
    key_id = normal_key_id(key_id)
    _check_secret(secret)
    body = _TYPE_NUMBERS[ref.record_type] << _ID_BITS | int(ref.activity_id, 16)
    value = body << _MAC_BITS | _mac(secret, key_id, body)
    chars = []
    for _ in range(_BODY_CHARS):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return key_id + "".join(reversed(chars))


def verify(token: str, keys: Mapping[str, bytes]) -> CodeRef | None:
    """What ``token`` names, if it is a code signed by one of ``keys`` (key id → secret);
    None when it is malformed, its key is unknown (or retired) or its MAC does not match."""
    code = normalise(token)
    if code is None:
        return None
    secret = None
    for key_id, candidate in keys.items():
        try:
            if normal_key_id(key_id) == code[0]:
                secret = candidate
                break
        except ValueError:
            continue  # a key id that can never appear in a code
    if secret is None:
        return None
    _check_secret(secret)
    value = 0
    for ch in code[1:]:
        value = value << 5 | _DECODE[ch]
    mac = value & ((1 << _MAC_BITS) - 1)
    body = value >> _MAC_BITS
    if not hmac.compare_digest(
        mac.to_bytes(_MAC_BITS // 8, "big"), _mac(secret, code[0], body).to_bytes(10, "big")
    ):
        return None
    record_type = _TYPE_NAMES.get(body >> _ID_BITS)
    if record_type is None:
        return None  # a type number this version does not know; cannot be signed by us
    return CodeRef(record_type, f"{body & ((1 << _ID_BITS) - 1):024x}")


# --- in text ----------------------------------------------------------------------------------


def in_text(code: str) -> str:
    """How a code is written in a subject or a body: ``[CRM-<code>]``."""
    return f"[CRM-{code}]"


def find_codes(text: str) -> list[str]:
    """Every candidate code in a subject, plain text or HTML, canonical, first seen first.

    Candidates still need ``verify``. The text is also read with its HTML tags taken out and
    its entities decoded, since editors put a code's pieces in separate elements or write its
    brackets and the spaces around it as entities; reply prefixes, quoting with ``>`` and edits
    around the code do not matter because only the ``CRM-`` token itself is looked for. A code
    that a quoting client wrapped onto two lines is found in the text with its line breaks and
    quote markers taken out.
    """
    views = [text]
    if "<" in text or "&" in text:
        views.append(html.unescape(_TAG.sub("", text)))
    # The same again with line breaks and quote markers taken out (a code wrapped inside a
    # quoted line). It glues words together too, which only ever loses candidates there,
    # never makes a false one: whatever is found still has to verify. Only where "crm" can
    # be in it: with every space, line break and ``>`` taken out (more than the joining
    # takes out, so nothing is missed) the text must still hold it.
    views.extend(
        [
            without_breaks(view)
            for view in views
            if "\n" in view and "crm" in view.lower().translate(_GLUED)
        ]
    )
    found: dict[str, None] = {}
    for view in views:
        for match in _codes_in(view):
            code = normalise(match.group(1))
            if code is not None:
                found.setdefault(code)
    return list(found)


def _codes_in(text: str) -> Iterator[re.Match[str]]:
    """``_IN_TEXT.finditer(text)``, tried only where "crm" (any case) starts: the pattern
    begins with a look-behind, so it would be tried at every position of a long mail."""
    low = text.lower()
    if len(low) != len(text):  # a letter whose lower case is longer: positions differ
        yield from _IN_TEXT.finditer(text)
        return
    at = low.find("crm")
    while at >= 0:
        match = _IN_TEXT.match(text, at)  # the look-behind still sees what is before ``at``
        if match is not None:
            yield match
            at = match.end()
        else:
            at += 1
        at = low.find("crm", at)


_GLUED = str.maketrans("", "", " \t\r\n>")


def without_breaks(text: str) -> str:
    """``text`` with every line break taken out, with the spaces and tabs before it (and a
    carriage return just before it) and the spaces, tabs and quote markers after it: what
    ``_BREAK.sub("", text)`` makes, by lines, several times faster than the pattern, which is
    tried at every position of a long quoted mail."""
    lines = text.split("\n")
    if len(lines) == 1:
        return text
    out = []
    last = len(lines) - 1
    for n, line in enumerate(lines):
        if n:
            line = line.lstrip(" \t>")
        if n < last:
            if line.endswith("\r"):
                line = line[:-1]
            line = line.rstrip(" \t")
        out.append(line)
    return "".join(out)


def code_from_address(local_part: str, inbox_local: str) -> str | None:
    """The code of a plus-address ``<inbox_local>+<code>``, canonical; None for any other
    local part. Case-insensitive, as mail systems do not keep the case of addresses."""
    prefix = inbox_local.strip().lower() + "+"
    local = local_part.strip()
    if not local.lower().startswith(prefix):
        return None
    return normalise(local[len(prefix) :])


def plus_local_part(inbox_local: str, code: str) -> str:
    """The local part of the Reply-To address that carries ``code``."""
    return f"{inbox_local}+{code}"


def subject_without_codes(subject: str) -> str:
    """``subject`` without the codes in it (and the brackets they leave behind)."""
    bare = _IN_TEXT.sub("", subject)
    bare = re.sub(r"\[\s*\]", "", bare)
    return " ".join(bare.split())


def subject_with_code(subject: str, code: str) -> str:
    """``subject`` with ``code`` at its end; a code already in it is replaced, so a subject
    carries one code (a reply from the CRM keeps its thread's, see the mail bridge's send)."""
    bare = subject_without_codes(subject)
    return f"{bare} {in_text(code)}" if bare else in_text(code)


def body_line(code: str) -> str:
    """A visible line for a mail's body. Visible text because it is the only thing every
    client keeps: Gmail strips HTML attributes and Outlook drops HTML comments."""
    return f"Please keep this reference in your reply: {in_text(code)}"


# --- reply prefixes -----------------------------------------------------------------------------

_PREFIX_WORDS = (
    "re",  # English, and what most clients write in any language
    "aw",  # German (Antwort)
    "antw",  # Dutch, German
    "antwort",
    "vs",  # Finnish (vastaus)
    "sv",  # Swedish, Danish, Norwegian (svar)
    "odp",  # Polish
    "rif",  # Italian
    "ref",
    "fwd",
    "fw",
    "wg",  # German (weitergeleitet)
    "tr",  # French (transféré)
    "enc",  # Portuguese (encaminhada)
    "doorst",  # Dutch (doorgestuurd)
    "rv",  # Spanish (reenviado)
    "回复",
    "答复",
    "转发",
)
_PREFIX = re.compile(
    # the colon may be a full-width one (U+FF1A) after a CJK prefix
    # (no two \s* side by side: "Re" and 20,000 spaces would backtrack quadratically)
    r"\s*(?:" + "|".join(_PREFIX_WORDS) + r")(?:\s*(?:\[\d{1,4}\]|\(\d{1,4}\)))?\s*[:\uff1a]",
    re.IGNORECASE,
)


def strip_reply_prefixes(subject: str) -> str:
    """``subject`` without the reply and forward prefixes clients put before it, however many,
    in any case, with or without counters (``RE[2]:``, ``Aw(3):``)."""
    pos = 0
    while (match := _PREFIX.match(subject, pos)) is not None:
        pos = match.end()
    return subject[pos:].strip()
