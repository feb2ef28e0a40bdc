"""What the mail server in front says of a message's sender: Authentication-Results (RFC 8601).
Pure, no I/O.

The hub checks no SPF, DKIM or DMARC itself. The MTA in front does, and writes what it found
in ``Authentication-Results`` fields that start with its *authserv-id* (usually its host
name). Anyone can write such a field into a message, so:

* Only fields whose authserv-id is one the admin named (``PORTALHUB_MAIL_TRUSTED_AUTHSERV_IDS``)
  count; any other is ignored.
* Of those, only the **topmost group** counts: a server adds its fields on top of the
  message, above everything the sender wrote. The group is read from the first trusted field
  (from the top) down to the next ``Received`` field: the ``Received`` that marks the hop
  before the trusted server's. A trusted-looking field further down was written by the
  sender. (RFC 8601, 5, also asks the trusted server to delete fields claiming its own
  authserv-id from incoming mail; OpenDKIM, OpenDMARC and rspamd do.)
* **A failure wins over a pass**: among the fields read, a pass cannot hide a failure. So a
  forged "pass" next to the server's "fail" changes nothing.

The verdict, for a message whose ``From`` is in domain D:

* ``dmarc=fail`` in any field read: **suspicious** (DMARC is the check that ties SPF and DKIM
  to the ``From`` domain; it fails whatever the domain's policy says to do about it);
* else ``spf=fail`` (a hard fail; not ``softfail``, which the domain itself says to treat
  leniently) and no ``dkim=pass`` for D (``header.d`` or the domain of ``header.i`` is D, or
  one is a subdomain of the other): **suspicious**;
* else not. No trusted field at all: not checked (and not suspicious).

A suspicious message is not matched to a record by its ``From`` address alone and makes no
lead; a reply code, thread or subject rule still matches it, flagged (``docs/mail.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

MAX_FIELD_CHARS = 8192  # one field; real ones are a few hundred characters
MAX_RESULTS = 50  # per field
MAX_FIELDS = 100  # read from the top of a message


@dataclass(frozen=True, slots=True)
class Result:
    method: str  # "dmarc", "spf", "dkim", ... (lower case, version dropped)
    result: str  # "pass", "fail", "softfail", "none", ... (lower case)
    props: Mapping[str, str] = field(default_factory=dict)  # "header.from": "example.com"


@dataclass(frozen=True, slots=True)
class AuthResults:
    authserv_id: str  # lower case
    results: tuple[Result, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    checked: bool  # a trusted server reported on the message
    suspicious: bool
    reason: str | None = None  # e.g. "dmarc=fail (header.from=example.com)"


UNCHECKED = Verdict(False, False)

# --- parsing ----------------------------------------------------------------------------------


def _without_comments(value: str) -> str:
    """``value`` with its (nested) comments replaced by a space; quoted strings kept."""
    out: list[str] = []
    depth = 0
    quoted = False
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and (quoted or depth) and i + 1 < len(value):
            if quoted:
                out.append(value[i : i + 2])
            i += 2
            continue
        if quoted:
            out.append(ch)
            quoted = ch != '"'
        elif ch == "(":
            depth += 1
            if depth == 1:
                out.append(" ")
        elif ch == ")" and depth:
            depth -= 1
        elif depth:
            pass
        else:
            out.append(ch)
            quoted = ch == '"'
        i += 1
    return "".join(out)


def _pairs(segment: str) -> list[tuple[str, str]] | None:
    """``key=value`` pairs separated by whitespace (a value quoted, or up to the next
    whitespace: base64 in ``header.b`` may end in ``=``); None when the segment is not that."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(segment)
    while True:
        while i < n and segment[i].isspace():
            i += 1
        if i >= n:
            return pairs
        start = i
        while i < n and not segment[i].isspace() and segment[i] not in '="':
            i += 1
        key = segment[start:i]
        while i < n and segment[i].isspace():
            i += 1
        if not key or i >= n or segment[i] != "=":
            return None
        i += 1
        while i < n and segment[i].isspace():
            i += 1
        if i < n and segment[i] == '"':
            i += 1
            text: list[str] = []
            while i < n and segment[i] != '"':
                if segment[i] == "\\" and i + 1 < n:
                    i += 1
                text.append(segment[i])
                i += 1
            i += 1
            value = "".join(text)
        else:
            start = i
            while i < n and not segment[i].isspace():
                i += 1
            value = segment[start:i]
        pairs.append((key.lower(), value))


def _split(value: str) -> list[str]:
    """``value`` cut at the semicolons outside quoted strings."""
    parts: list[str] = []
    start = 0
    quoted = False
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            parts.append(value[start:i])
            start = i + 1
        i += 1
    parts.append(value[start:])
    return parts


def _result(segment: str) -> Result | None:
    """``method[/version]=result [reason=...] [ptype.property=value ...]``, or None."""
    pairs = _pairs(segment)
    if not pairs:
        return None
    method = pairs[0][0].split("/", 1)[0].strip()
    if not method or "." in method:
        return None
    props = {k: v.strip().lower() for k, v in pairs[1:] if "." in k}
    return Result(method, pairs[0][1].strip().lower(), props)


def parse_field(value: str) -> AuthResults | None:
    """One ``Authentication-Results`` field's value; None when it is not one."""
    text = _without_comments(value[:MAX_FIELD_CHARS].replace("\r", " ").replace("\n", " "))
    parts = _split(text)
    head = parts[0].split()
    if not head or "=" in head[0]:
        return None
    authserv_id = head[0].strip('"').lower()
    results: list[Result] = []
    for segment in parts[1 : MAX_RESULTS + 1]:
        if segment.strip().lower() == "none":
            continue
        found = _result(segment)
        if found is not None:
            results.append(found)
    return AuthResults(authserv_id, tuple(results))


# --- which fields count -------------------------------------------------------------------------


def trusted_results(
    fields: Sequence[tuple[str, str]], trusted_ids: Iterable[str]
) -> list[AuthResults]:
    """The trusted server's results in a message's header fields (``(name, value)`` from the
    top, names in lower case): the fields with a trusted authserv-id from the first of them
    down to the next ``Received``."""
    trusted = {t.strip().lower() for t in trusted_ids if t.strip()}
    if not trusted:
        return []
    found: list[AuthResults] = []
    for name, value in fields[:MAX_FIELDS]:
        if name == "received":
            if found:
                break
            continue
        if name != "authentication-results":
            continue
        parsed = parse_field(value)
        if parsed is not None and parsed.authserv_id in trusted:
            found.append(parsed)
    return found


# --- the verdict --------------------------------------------------------------------------------


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(".").lower()


def aligned(signer: str, from_domain: str) -> bool:
    """A DKIM signing domain that speaks for the ``From`` domain: the same, or one a subdomain
    of the other (DMARC's relaxed alignment, without a public-suffix list: a signer of
    "com" would need the key of "com")."""
    signer, from_domain = signer.strip().strip(".").lower(), from_domain.strip(".").lower()
    if not signer or not from_domain:
        return False
    if signer == from_domain:
        return True
    shorter, longer = sorted((signer, from_domain), key=len)
    return "." in shorter and longer.endswith("." + shorter)


def _describe(result: Result, keys: tuple[str, ...]) -> str:
    shown = [f"{k}={result.props[k]}" for k in keys if result.props.get(k)]
    return f"{result.method}={result.result}" + (f" ({', '.join(shown)})" if shown else "")


def judge(found: Sequence[AuthResults], from_address: str) -> Verdict:
    """The verdict on a message from ``from_address`` given its trusted results."""
    if not found:
        return UNCHECKED
    results = [r for group in found for r in group.results]
    from_domain = _domain(from_address)
    for r in results:
        if r.method == "dmarc" and r.result == "fail":
            return Verdict(True, True, _describe(r, ("header.from", "policy.dmarc")))
    spf_failed = next((r for r in results if r.method == "spf" and r.result == "fail"), None)
    if spf_failed is not None:
        signed = any(
            r.method == "dkim"
            and r.result == "pass"
            and (
                aligned(r.props.get("header.d", ""), from_domain)
                or aligned(_domain(r.props.get("header.i", "")), from_domain)
            )
            for r in results
        )
        if not signed:
            reason = _describe(spf_failed, ("smtp.mailfrom",))
            return Verdict(True, True, f"{reason}, and no DKIM signature of {from_domain} passed")
    return Verdict(True, False)
