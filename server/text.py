"""Which characters text may carry: XML 1.0's rule for all text, a stricter one for names.

Everything people type can end up in an XMPP stream (a message body, a roster name, a vCard,
a system notice quoting a task or CRM title), and a stream is XML 1.0: a character outside
``Char ::= #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF]`` makes
the receiving client's parser fail and end its session. So:

- **text** (messages, descriptions, comments, mail bodies, ...) may hold any character XML 1.0
  can carry, line breaks and tabs included, and bidirectional controls too (right-to-left text
  pasted from elsewhere carries them; a client shows each message in its own isolated box);
- **names** (people's first and last names and positions, department, workgroup and chat
  names, task and CRM titles, CRM stages, fields and options, templates, mailboxes) are one
  line shown inside other text: a roster, a notice "Anna put you on task ...". They may not
  hold any control character (C0 including TAB, CR and LF; DEL; C1), nor a line or paragraph
  separator (U+2028, U+2029), nor a bidirectional embedding, override or isolate (U+202A-
  U+202E, U+2066-U+2069), which would reorder the text around the name wherever it is shown
  (the "Trojan Source" trick, CVE-2021-42574). The marks U+200E, U+200F and U+061C (LRM, RLM,
  ALM) stay allowed: they are zero-width letters with a direction, open no scope that could
  leak past the name, and are what a right-to-left name needs to be written correctly.

Entry points refuse what breaks these rules (``check_text``, ``check_name``, and the pydantic
markers ``XML_TEXT`` and ``NAME_TEXT``); text the portal does not control (received mail) is
cleaned instead (``xml_safe``, ``clean_name``); the XMPP serialiser passes everything through
``xml_safe`` once more, so that data stored before these rules, or by a path that missed them,
cannot break a stream either.
"""

from __future__ import annotations

import re
import unicodedata

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

REPLACEMENT = "\ufffd"

# The complement of XML 1.0's Char production.
_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Embeddings, overrides, their pop, and isolates: each opens or closes a scope."""

# Everything a name may not hold: every C0 and C1 control and DEL, the line and paragraph
# separators, the bidirectional scopes, and what XML 1.0 cannot carry besides (surrogates,
# U+FFFE, U+FFFF).
_NAME_ILLEGAL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff\ufffe\uffff]"
)
_BREAK = "\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff"
_NAME_BREAKS = re.compile(f"[{_BREAK}]+")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")


def is_xml_char(char: str) -> bool:
    """Whether XML 1.0 can carry ``char`` (one character)."""
    return _XML_ILLEGAL.match(char) is None


def find_xml_illegal(text: str) -> str | None:
    """The first character of ``text`` that XML 1.0 cannot carry, or None."""
    found = _XML_ILLEGAL.search(text)
    return found.group() if found else None


def find_name_illegal(text: str) -> str | None:
    """The first character of ``text`` that a name may not hold, or None."""
    found = _NAME_ILLEGAL.search(text)
    return found.group() if found else None


def xml_safe(text: str, replacement: str = REPLACEMENT) -> str:
    """``text`` with each character XML 1.0 cannot carry replaced (by U+FFFD by default, so
    that a reader sees that something was there). Returns ``text`` itself when it is clean."""
    if _XML_ILLEGAL.search(text) is None:
        return text
    return _XML_ILLEGAL.sub(replacement, text)


def clean_name(text: str) -> str:
    """``text`` made into a name, for names the portal does not control (a mail sender's):
    bidirectional scopes dropped, every run of control characters, line breaks and what XML
    cannot carry (with the spaces around it) made one space, the ends stripped."""
    # Split, not one regex with the spaces around each run: "[ C]*[C][ C]*" backtracks
    # quadratically over a long run of spaces without a control character after it.
    parts = _NAME_BREAKS.split(_BIDI.sub("", text))
    if len(parts) > 1:
        inner = (p.strip(" ") for p in parts[1:-1])
        parts = [parts[0].rstrip(" "), *inner, parts[-1].lstrip(" ")]
    return " ".join(p for p in parts if p).strip()


def describe(char: str) -> str:
    """``char`` for an error message: its code point and what kind of character it is."""
    point = ord(char)
    if 0xD800 <= point <= 0xDFFF:
        kind = "a lone surrogate"
    elif char in ("\ufffe", "\uffff"):
        kind = "a noncharacter"
    elif char in BIDI_CONTROLS:
        kind = "a bidirectional control"
    elif char in ("\u2028", "\u2029"):
        kind = "a line break"
    elif unicodedata.category(char) == "Cc":
        kind = "a control character"
    else:
        kind = unicodedata.name(char, "a special character")
    return f"U+{point:04X} ({kind})"


def check_text(value: str) -> str:
    """``value`` if XML 1.0 can carry all of it; else a pydantic error naming the character."""
    bad = find_xml_illegal(value)
    if bad is not None:
        raise PydanticCustomError(
            "text_character",
            "must not contain {character}: text can hold no such character",
            {"character": describe(bad)},
        )
    return value


def check_name(value: str) -> str:
    """``value`` if it is a valid name; else a pydantic error naming the character."""
    bad = find_name_illegal(value)
    if bad is not None:
        raise PydanticCustomError(
            "name_character",
            "must not contain {character}: a name is one line of plain text, without control "
            "characters, line breaks or bidirectional controls",
            {"character": describe(bad)},
        )
    return value


XML_TEXT = AfterValidator(check_text)
"""Pydantic marker for a text field: ``Annotated[str, StringConstraints(...), XML_TEXT]``.
Put it last, so that it sees the value after stripping."""

NAME_TEXT = AfterValidator(check_name)
"""Pydantic marker for a name field; put it last, like ``XML_TEXT``."""
