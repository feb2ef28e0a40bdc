"""The mail bridge's rules that need no I/O: admins' subject rules, whether an unknown sender
may become a lead, and how addresses compare. Pure, no I/O.

Subject rules are regular expressions written by admins and run on subjects written by
strangers, so they must not hang the pipeline. Python's ``re`` cannot be interrupted, so
patterns run on the third-party ``regex`` module, whose ``timeout`` stops a match that
backtracks for too long. Two cheaper guards come first: ``validate_rule`` refuses the
classic catastrophic shape (a quantified group that holds a quantifier, like ``(a+)+``)
when the rule is saved, and only the first ``MAX_SUBJECT_CHARS`` of a subject are matched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import regex  # type: ignore[import-untyped]

MAX_PATTERN_CHARS = 500
MAX_SUBJECT_CHARS = 1000
DEFAULT_TIMEOUT = 0.05  # seconds, for each rule


@dataclass(frozen=True, slots=True)
class SubjectRule:
    """A subject matching ``pattern`` belongs to the record of ``record_type`` whose ``field``
    ("id", or the code of one of the type's custom fields) equals what the pattern captured
    (its group named ``code``, or else its first group that took part)."""

    id: str
    pattern: str
    record_type: str
    field: str = "id"


class _Pattern:
    """What ``validate_rule`` needs to know of a pattern, read from its text."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.i = 0

    def _skip_class(self) -> None:
        p = self.pattern
        self.i += 1
        if self.i < len(p) and p[self.i] == "^":
            self.i += 1
        if self.i < len(p) and p[self.i] == "]":
            self.i += 1  # a ']' first in a class is a literal
        while self.i < len(p) and p[self.i] != "]":
            self.i += 2 if p[self.i] == "\\" else 1
        self.i += 1

    def _quantifier(self) -> tuple[int, bool] | None:
        """(its maximum, whether unbounded) if a quantifier starts here, moving past it."""
        p = self.pattern
        ch = p[self.i]
        if ch in "*+":
            self.i += 1
            result = (-1, True)
        elif ch == "?":
            self.i += 1
            result = (1, False)
        else:
            found = re.match(r"\{(\d*)(,?)(\d*)\}", p[self.i :])
            if found is None or not (found.group(1) or found.group(3)):
                return None  # a literal '{'
            self.i += found.end()
            low, comma, high = found.groups()
            if not comma:
                result = (int(low), False)
            elif high:
                result = (int(high), False)
            else:
                result = (-1, True)
        if self.i < len(p) and p[self.i] in "?+":
            self.i += 1  # lazy or possessive: the same backtracking when it fails
        return result

    def _open_group(self) -> bool:
        """Moves past a '(' and its '?…' prefix; False for the constructs that hold no
        pattern (comments, flags, back-references)."""
        p = self.pattern
        self.i += 1
        if not p.startswith("?", self.i):
            return True
        rest = p[self.i :]
        if rest.startswith(("?#", "?P=")) or re.match(r"\?[aiLmsux-]+\)", rest):
            self.i = p.find(")", self.i) + 1
            return False
        named = re.match(r"\?P?<[A-Za-z_]\w*>", rest)
        if named:
            self.i += named.end()
        elif rest.startswith(("?<=", "?<!")):
            self.i += 3
        elif rest.startswith("?("):
            self.i = p.find(")", self.i) + 1  # a conditional's condition
        else:
            flags = re.match(r"\?[aiLmsux-]*[:=!>]", rest)
            self.i += flags.end() if flags else 1
        return True

    def nested_quantifier(self) -> bool:
        """Whether a repeated group holds a repetition, with one of the two unbounded:
        ``(a+)+``, ``(.*)*``, ``(\\w+\\s?)*``, ``(a{1,3})*``. ``(\\d{2}-){3}`` is fine."""
        p = self.pattern
        # per open group: (holds a repetition, holds an unbounded one)
        stack: list[list[bool]] = [[False, False]]
        last_group: list[bool] | None = None  # what a quantifier here would repeat
        while self.i < len(p):
            ch = p[self.i]
            if ch == "\\":
                self.i += 2
                last_group = None
            elif ch == "[":
                self._skip_class()
                last_group = None
            elif ch == "(":
                last_group = None
                if self._open_group():
                    stack.append([False, False])
            elif ch == ")":
                self.i += 1
                inner = stack.pop() if len(stack) > 1 else [False, False]
                stack[-1][0] |= inner[0]
                stack[-1][1] |= inner[1]
                last_group = inner
            elif ch in "*+?{":
                quantifier = self._quantifier()
                if quantifier is None:
                    self.i += 1
                    last_group = None
                    continue
                maximum, unbounded = quantifier
                repeats = unbounded or maximum > 1
                if (
                    repeats
                    and last_group is not None
                    and last_group[0]
                    and (unbounded or last_group[1])
                ):
                    return True
                if repeats:
                    stack[-1][0] = True
                    stack[-1][1] |= unbounded
                last_group = None
            else:
                self.i += 1
                last_group = None
        return False


def validate_rule(pattern: str) -> None:
    """Raises ``ValueError`` unless ``pattern`` may be a subject rule: at most
    ``MAX_PATTERN_CHARS``, valid for ``re`` (so it means what the admin read about) and for
    ``regex`` (which runs it), with a capturing group, and without a nested quantifier."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"subject rule: at most {MAX_PATTERN_CHARS} characters")
    try:
        compiled = re.compile(pattern)
        _compiled(pattern)
    except (re.error, regex.error, ValueError, OverflowError) as exc:
        raise ValueError(f"subject rule: not a valid regular expression ({exc})") from None
    if compiled.groups == 0:
        raise ValueError("subject rule: it needs a capturing group ( … ) around the code")
    if _Pattern(pattern).nested_quantifier():
        raise ValueError(
            "subject rule: a repeated group holds a repetition, as in (a+)+ - such a pattern "
            "can take forever on some subjects; repeat the group or its content, not both"
        )


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> Any:
    return regex.compile(pattern, regex.VERSION0)


def _code(match: Any) -> str | None:
    if "code" in match.re.groupindex and match.group("code"):
        return str(match.group("code")).strip() or None
    for group in match.groups():
        if group:
            return str(group).strip() or None
    return None


def apply_rules(
    rules: Sequence[SubjectRule], subject: str, timeout: float = DEFAULT_TIMEOUT
) -> tuple[SubjectRule, str] | None:
    """The first rule that matches ``subject`` and what it captured. A rule that is invalid
    or takes longer than ``timeout`` seconds counts as not matching, so one bad rule cannot
    stop mail or the rules after it."""
    subject = subject[:MAX_SUBJECT_CHARS]
    for rule in rules:
        try:
            validate_rule(rule.pattern)
            match = _compiled(rule.pattern).search(subject, timeout=timeout)
        except (ValueError, TimeoutError):
            continue
        if match is None:
            continue
        code = _code(match)
        if code is not None:
            return rule, code
    return None


# --- addresses ----------------------------------------------------------------------------------


def normal_address(address: str) -> str:
    """An address as compared: trimmed, without angle brackets, lower-case in both parts. A
    plus tag stays: bob+crm@ and bob@ may be told apart by the people who use them."""
    return address.strip().strip("<>").strip().lower().rstrip(".")


def domain_of(address: str) -> str:
    """The domain of an address, lower-case ("" when there is none)."""
    local, at, domain = normal_address(address).rpartition("@")
    return domain if at and local else ""


def _without_plus_tag(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local.split('+', 1)[0]}{at}{domain}" if at else address


def sender_matches(sender: str, record_emails: Iterable[str]) -> bool:
    """Whether ``sender`` is one of the record's addresses. ``bob+tag@`` counts as ``bob@``
    here: it is the same mailbox, and this only decides whether to flag a reply whose valid
    code came from someone the record does not know (a forwarded mail, a leaked code)."""
    address = normal_address(sender)
    if "@" not in address:
        return False
    known = {normal_address(e) for e in record_emails}
    return address in known or _without_plus_tag(address) in {_without_plus_tag(k) for k in known}


def _excepted(address: str, exceptions: Iterable[str]) -> bool:
    domain = domain_of(address)
    for entry in exceptions:
        entry = normal_address(entry)
        if not entry:
            continue
        if "@" in entry.lstrip("@"):
            if entry == address:
                return True
            continue
        excepted = entry.lstrip("@").lstrip("*.").strip(".")
        # a domain covers its subdomains: mail.example.com is example.com's
        if excepted and (domain == excepted or domain.endswith("." + excepted)):
            return True
    return False


def lead_allowed(
    sender: str, exceptions: Iterable[str], recent_count: int, max_per_period: int
) -> bool:
    """Whether mail from the unknown ``sender`` may create a lead: it has an address, is not
    among ``exceptions`` (addresses, or domains written ``@example.com`` or ``example.com``,
    each with its subdomains) and fewer than ``max_per_period`` leads came from it in the
    period (``recent_count``); a maximum of 0 makes no leads from mail at all."""
    address = normal_address(sender)
    if not domain_of(address):
        return False
    if _excepted(address, exceptions):
        return False
    return recent_count < max_per_period


# --- names ----------------------------------------------------------------------------------------

# Words a display name carries that are no part of a person's name.
_NAME_NOISE = re.compile(r"\s*[(\[].*?[)\]]\s*|\s+via\s+.*$", re.IGNORECASE)


def split_name(display_name: str, address: str = "") -> tuple[str, str]:
    """(first name, last name) of a sender's display name, for a lead made from their mail.

    "Carl Client" is Carl / Client, "Client, Carl" (the directory form) too, "Anna Maria van
    der Berg" is Anna Maria / van der Berg (the particles go with the last name); one word is a
    first name, so that "Dear {{record.first_name}}," reads right. A comment in brackets
    ("Carl Client (Sales)") and a mailing list's "… via List" are dropped. A name that is the
    address itself, or holds one, is no name: ("", "").
    """
    name = " ".join(_NAME_NOISE.sub(" ", display_name).replace('"', " ").split())
    if not name or "@" in name or (address and name.lower() == address.strip().lower()):
        return "", ""
    if name.count(",") == 1:
        last, first = (part.strip() for part in name.split(","))
        if first and last and " " not in last.strip():
            return first[:100], last[:100]
    words = name.replace(",", " ").split()
    if len(words) == 1:
        return words[0][:100], ""
    cut = len(words) - 1
    while cut > 1 and words[cut - 1].lower() in _PARTICLES:
        cut -= 1
    return " ".join(words[:cut])[:100], " ".join(words[cut:])[:100]


_PARTICLES = frozenset(
    {"van", "von", "der", "den", "de", "del", "della", "di", "da", "du", "la", "le", "ten", "ter"}
)
