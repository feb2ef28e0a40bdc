"""Incoming mail, from raw bytes to a ``ParsedMail``. Pure, no I/O.

Everything here reads what a stranger sent, so nothing may raise on bad input except
``MailTooComplex``, and nothing may take more than roughly linear time in the size of the
message. Three decisions follow from that:

* The stdlib parser runs with the ``compat32`` policy, not ``policy.default``. The modern
  header parser behind ``policy.default`` is recursive and slow on hostile headers: a
  ``Content-Type`` with 5,000 nested comments raises ``RecursionError`` inside the parse
  itself, and one with 10,000 parameters takes seven seconds. Headers are therefore decoded
  here (RFC 2047 and RFC 2231), which also lets the charset handling forgive what the stdlib
  would turn into surrogates.
* MIME bombs are refused while parsing, not after: the parser's message factory counts the
  parts and the nesting as they are created, and ``Content-Type``/``Content-Disposition``
  fields are measured on the raw bytes first, because the stdlib's parameter splitting is
  quadratic in the number of semicolons. A part's decoded size is estimated from its encoded
  length before it is decoded.
* HTML goes through nh3 (ammonia) once; the plain text of an HTML-only mail is rendered from
  that sanitised, well-formed output, so the stdlib's ``HTMLParser`` never sees malformed
  markup. html5ever (under nh3) has quadratic corners: nesting (20,000 nested ``<div>``: 0.7 s),
  distinct attributes on one tag (60,000: 0.8 s), character references or no-break spaces in
  one text run (400,000 ``&``: 1 s). So HTML is cut at ``Limits.max_html_chars`` and at
  ``Limits.max_html_tags`` tags, and long runs of ``&`` are broken up, before nh3 sees it:
  whatever other corner it has is then bounded by the size it is given.

Attachments are kept exactly as sent and never unpacked: an archive is stored as the archive,
so a zip bomb is only ever as large as its compressed size, which the limits already bound.

The text read out of a mail is what the portal shows, stores and passes on (activities,
notices over XMPP), so it keeps to ``server.text``'s rules: a character XML 1.0 cannot carry
becomes U+FFFD in bodies and addresses, and the one-line texts (subject, display names,
attachment file names) are cleaned as names (no control characters, no bidirectional scopes
that would turn "invoice\u202efdp.exe" around). Mail is never refused for them; the raw
message is kept as it came.
"""

from __future__ import annotations

import binascii
import codecs
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.feedparser import BytesFeedParser
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any

import nh3

from server.text import clean_name, xml_safe

# --- limits -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """What one message may hold. Exceeding any refuses the whole message."""

    max_message_bytes: int = 72 << 20  # raw; 50 MiB of base64 content is ~68 MiB encoded
    max_parts: int = 200  # every entity: the message, each part, each attached message
    max_depth: int = 10  # multiparts and attached messages inside each other
    max_attachment_bytes: int = 10 << 20  # each part, decoded
    max_total_decoded_bytes: int = 50 << 20
    max_attachments: int = 50
    max_header_bytes: int = 1 << 20  # one entity's header section
    # Not refusals: text and HTML longer than these are cut, and ``ParsedMail.truncated`` says
    # so. Nobody reads a million characters of a reply, and both bound the work after parsing.
    max_text_chars: int = 1_000_000
    max_html_chars: int = 256 << 10
    max_html_tags: int = 20_000


class MailTooComplex(Exception):
    """The message exceeds a ``Limits``; refuse it (SMTP 552) rather than process it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# A parameter field is split by the stdlib in time quadratic in its semicolons; real ones have
# a handful (an RFC 2231 file name split into pieces has a few dozen).
_MAX_PARAM_FIELD_BYTES = 16 << 10
_MAX_PARAM_FIELD_SEMICOLONS = 200
_PARAM_FIELD = re.compile(rb"(?im)^content-(?:type|disposition)[ \t]*:")


def _check_param_fields(raw: bytes) -> None:
    # Every line that could be such a field is measured, wherever it is: which lines are headers
    # is only known after parsing, and that is what this protects.
    for match in _PARAM_FIELD.finditer(raw):
        start = pos = match.start()
        end = len(raw)
        while True:
            newline = raw.find(b"\n", pos)
            if newline < 0 or newline - start > _MAX_PARAM_FIELD_BYTES:
                break
            if raw[newline + 1 : newline + 2] not in (b" ", b"\t"):
                end = newline
                break
            pos = newline + 1
        if end - start > _MAX_PARAM_FIELD_BYTES:
            raise MailTooComplex("a Content-Type or Content-Disposition field is too long")
        if raw.count(b";", start, end) > _MAX_PARAM_FIELD_SEMICOLONS:
            raise MailTooComplex("a Content-Type or Content-Disposition has too many parameters")


class _Entity(Message):
    """A parsed entity whose text payload ``get_payload()`` returns as stored: ASCII, with
    8-bit bytes as surrogate escapes (what ``_raw_bytes`` undoes). The stdlib would decode
    such a payload with the sender's declared charset on every call, and a sender may declare
    ``punycode``, which decodes in quadratic time (120 KB took minutes)."""

    def get_payload(self, i: int | None = None, decode: bool = False) -> Any:
        if not decode and i is None and not self.is_multipart():
            return vars(self)["_payload"]  # set by the parser; typeshed does not declare it
        base: Any = super()  # typeshed's overloads cannot take a plain bool
        return base.get_payload(i, decode)


class _CountingFactory:
    """The parser's message factory: refuses the message as soon as it holds too many parts or
    nests too deep, long before the parser has worked through a bomb's thousands of parts."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self.parser: BytesFeedParser | None = None
        self.parts = 0

    def __call__(self, policy: Any = policy.compat32) -> Message:
        if self.parser is not None:  # the parser's constructor calls us once to probe
            self.parts += 1
            if self.parts > self._limits.max_parts:
                raise MailTooComplex(f"more than {self._limits.max_parts} MIME parts")
            # The parser's stack of open entities; private, so if a future Python renames it
            # the nesting is still checked by ``_entities`` after parsing, just later.
            depth = len(getattr(self.parser, "_msgstack", ()))
            if depth > self._limits.max_depth:
                raise MailTooComplex(f"MIME parts nested more than {self._limits.max_depth} deep")
        return _Entity(policy)


def message_from_bytes(raw: bytes, limits: Limits | None = None) -> Message:
    """The stdlib ``Message`` (``compat32`` policy) of ``raw``, or ``MailTooComplex``."""
    limits = limits or Limits()
    if len(raw) > limits.max_message_bytes:
        raise MailTooComplex(f"message larger than {limits.max_message_bytes} bytes")
    _check_param_fields(raw)
    factory = _CountingFactory(limits)
    parser = BytesFeedParser(_factory=factory, policy=policy.compat32)
    factory.parser = parser
    try:
        parser.feed(raw)
        message = parser.close()
    except RecursionError:
        raise MailTooComplex("MIME parts nested too deep") from None
    if not isinstance(message, Message):
        raise MailTooComplex("not a mail message")
    for entity, depth in _entities(message):
        if depth > limits.max_depth:
            raise MailTooComplex(f"MIME parts nested more than {limits.max_depth} deep")
        if sum(len(k) + len(v) for k, v in entity.raw_items()) > limits.max_header_bytes:
            raise MailTooComplex("a header section is too large")
    return message


def within_limits_unparsed(raw: bytes, limits: Limits | None = None) -> bool:
    """Whether ``raw`` provably keeps every structural limit ``message_from_bytes`` and
    ``parse`` refuse for, read off bounds on its bytes alone (no parsing). False means only
    "not provable": the caller parses it (a MIME bomb is then refused as before).

    The bounds: every entity after the first starts after a line beginning with ``--`` (a
    boundary delimiter), unless it is inside a ``message/*`` or a ``multipart/digest``
    (whose parts are messages): those are left to the parser. Each level of multipart
    nesting needs a ``boundary`` parameter of its own. No header section, part or decoded
    total can be larger than the raw message (base64 and quoted-printable only shrink).

    Raises ``MailTooComplex`` for what the byte checks of the parser refuse anyway (the
    message's size, a ``Content-Type`` whose parameter list would make the stdlib quadratic).
    """
    limits = limits or Limits()
    if len(raw) > limits.max_message_bytes:
        raise MailTooComplex(f"message larger than {limits.max_message_bytes} bytes")
    _check_param_fields(raw)
    small = min(
        limits.max_header_bytes, limits.max_attachment_bytes, limits.max_total_decoded_bytes
    )
    if len(raw) > small:
        return False
    lower = raw.lower()
    if b"message/" in lower or b"digest" in lower:
        return False
    # Lines end in CRLF, LF or a bare CR for the stdlib parser: a delimiter after any of them.
    entities = 1 + lower.count(b"\n--") + lower.count(b"\r--") + lower.startswith(b"--")
    if entities > min(limits.max_parts, limits.max_attachments):
        return False
    return 1 + lower.count(b"boundary") <= limits.max_depth


def _entities(message: Message) -> Iterator[tuple[Message, int]]:
    """Every entity with its depth, iteratively (``Message.walk`` recurses)."""
    stack: list[tuple[Message, int]] = [(message, 0)]
    while stack:
        entity, depth = stack.pop()
        yield entity, depth
        payload = entity.get_payload()
        if isinstance(payload, list):
            stack.extend(
                (child, depth + 1) for child in reversed(payload) if isinstance(child, Message)
            )


# --- charsets -----------------------------------------------------------------------------------

# What mail declares and what it means: senders label text with the smaller charset but write
# the larger one's characters (Windows' code pages, HKSCS), so decode with the superset.
_CHARSET_SUPERSETS: Mapping[str, tuple[str, ...]] = {
    "gb2312": ("gb18030",),
    "gbk": ("gb18030",),
    "x-gbk": ("gb18030",),
    "cp936": ("gb18030",),
    "euc-cn": ("gb18030",),
    "shift_jis": ("cp932",),
    "shift-jis": ("cp932",),
    "sjis": ("cp932",),
    "x-sjis": ("cp932",),
    "ms_kanji": ("cp932",),
    "windows-31j": ("cp932",),
    "iso-2022-jp": ("iso2022_jp", "iso2022_jp_ext", "iso2022_jp_2"),
    "euc-kr": ("cp949",),
    "ks_c_5601-1987": ("cp949",),
    "big5": ("big5hkscs", "cp950"),
    "tis-620": ("cp874",),
    "iso-8859-8-i": ("iso-8859-8",),
    # Browsers read these as windows-1252 too, and mail labelled us-ascii often is not.
    "us-ascii": ("ascii", "utf-8", "cp1252"),
    "ascii": ("ascii", "utf-8", "cp1252"),
    "iso-8859-1": ("cp1252", "latin-1"),
    "latin1": ("cp1252", "latin-1"),
    "iso-8859-9": ("cp1254", "iso-8859-9"),
}
_UNLABELLED = ("utf-8", "cp1252")
_NOT_CHARSETS = frozenset({"punycode", "idna", "undefined"})  # codecs.lookup(...).name


def decode_bytes(data: bytes, charset: str | None) -> str:
    """``data`` as text in ``charset``; never raises. Unknown charsets are read as UTF-8 or
    else windows-1252, and bytes that do not decode become U+FFFD."""
    label = (charset or "").strip().strip("\"'").lower()
    candidates = _CHARSET_SUPERSETS.get(label, (label,)) if label else _UNLABELLED
    known = []
    for name in candidates:
        try:
            info = codecs.lookup(name)
        except (LookupError, ValueError):  # unknown, or not a name at all ("utf\x008")
            continue
        # Only a charset: not base64, zlib or rot13 (bytes.decode raises LookupError on those),
        # nor punycode (quadratic: 400 KB take two minutes), idna or undefined.
        if getattr(info, "_is_text_encoding", True) and info.name not in _NOT_CHARSETS:
            known.append(name)
    if not known:
        known = list(_UNLABELLED)
    for name in known:
        try:
            return data.decode(name)
        except (UnicodeDecodeError, ValueError):
            continue
    return data.decode(known[0], errors="replace")


def _raw_bytes(value: str) -> bytes:
    # The parser read headers and bodies as ASCII with surrogateescape: undo that to get the
    # bytes the sender wrote.
    return value.encode("utf-8", errors="surrogateescape")


# --- headers ------------------------------------------------------------------------------------

_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,60})(?:\*[^?\s]{0,20})?\?([bBqQ])\?([^?\s]*)\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _decode_word(encoding: str, text: str) -> bytes:
    try:
        if encoding in "bB":
            cleaned = re.sub(r"[^A-Za-z0-9+/]", "", text)
            cleaned += "=" * (-len(cleaned) % 4)
            if len(cleaned) % 4 == 1:  # one stray character cannot be a byte
                cleaned = cleaned[:-1]
            return binascii.a2b_base64(cleaned)
        return binascii.a2b_qp(text.encode("ascii", errors="replace"), header=True)
    except (binascii.Error, ValueError):
        return b""


def decode_header_value(value: str, fallback_charset: str | None = None) -> str:
    """A header's text: unfolded, RFC 2047 encoded words decoded, raw 8-bit bytes read as UTF-8
    (or ``fallback_charset``). Never raises.

    Adjacent encoded words in one charset are joined as bytes before decoding, since senders
    split a long subject wherever the line ends, including inside a multibyte character; the
    whitespace between encoded words is not text (RFC 2047, 6.2).
    """
    value = _FOLD.sub("", value)
    out: list[str] = []
    pending = b""
    pending_charset: str | None = None
    pos = 0

    def flush() -> None:
        nonlocal pending, pending_charset
        if pending_charset is not None:
            out.append(decode_bytes(pending, pending_charset))
        pending, pending_charset = b"", None

    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        if pending_charset is None or between.strip(" \t"):
            flush()
            out.append(_plain_header_text(between, fallback_charset))
        charset = match.group(1).lower()
        if pending_charset is not None and charset != pending_charset:
            flush()
        pending += _decode_word(match.group(2), match.group(3))
        pending_charset = charset
        pos = match.end()
    flush()
    out.append(_plain_header_text(value[pos:], fallback_charset))
    return "".join(out).replace("\r", "").replace("\n", " ")


def _plain_header_text(text: str, fallback_charset: str | None) -> str:
    if text.isascii():
        return text
    return decode_bytes(_raw_bytes(text), fallback_charset or "utf-8")


_MESSAGE_ID = re.compile(r"<([^<>\s]{1,996})>")


def _message_ids(value: str) -> list[str]:
    """The ids in a Message-ID / In-Reply-To / References field, as ``<id>``; a bare id without
    brackets (some clients) is taken whole. 8-bit bytes (raw in the header, kept as lone
    surrogates by the stdlib) are decoded first: a lone surrogate cannot be stored."""
    value = _FOLD.sub("", _plain_header_text(value, "utf-8"))
    value = "".join(c for c in value if c.isprintable() or c in " \t")
    found = [f"<{m}>" for m in _MESSAGE_ID.findall(value)]
    if not found:
        bare = value.strip()
        if bare and " " not in bare and "@" in bare and len(bare) <= 996:
            found = [f"<{bare}>"]
    return found


@dataclass(frozen=True, slots=True)
class Address:
    address: str
    name: str = ""


_ADDR_SPEC = re.compile(r"[^\s<>(),;:\"\[\]@]{1,64}@[^\s<>(),;:\"\[\]@]{1,255}")


def _addresses(values: list[str], fallback_charset: str | None) -> tuple[Address, ...]:
    unfolded = [_FOLD.sub("", v) for v in values]
    try:
        pairs = getaddresses(unfolded)
    except RecursionError:  # nested comments: the stdlib recurses on them
        pairs = [("", m) for v in unfolded for m in _ADDR_SPEC.findall(v)]
    found: list[Address] = []
    for name, address in pairs:
        address = _plain_header_text(address.strip(), fallback_charset)
        if "@" not in address:
            continue
        found.append(
            Address(xml_safe(address), clean_name(decode_header_value(name, fallback_charset)))
        )
    return tuple(found)


NOISE_HEADERS: tuple[str, ...] = (
    "auto-submitted",
    "x-autoreply",
    "x-autorespond",
    "x-auto-response-suppress",
    "x-autogenerated",
    "x-ms-exchange-generated-message-source",
    "precedence",
    "return-path",
    "list-id",
    "list-unsubscribe",
    "feedback-id",
)
"""Headers kept in ``ParsedMail.headers`` for telling automatic mail from people's mail."""

TRACE_HEADERS = frozenset({"received", "authentication-results"})
MAX_TRACE_FIELDS = 100
MAX_TRACE_CHARS = 8192

OUR_HEADER_PREFIX = "x-portalhub-"
"""Our own headers on mail we send (``X-PortalHub-Origin`` and so on), kept in
``ParsedMail.headers`` so that our own mail coming back is recognised."""


# --- parts --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    size: int  # bytes, decoded
    data: bytes = field(repr=False)
    inline: bool = False  # shown in the body (an image the HTML refers to), not attached
    content_id: str | None = None


class _Budget:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.spent = 0

    def spend(self, size: int) -> None:
        if size > self.limits.max_attachment_bytes:
            raise MailTooComplex(f"a part larger than {self.limits.max_attachment_bytes} bytes")
        self.spent += size
        if self.spent > self.limits.max_total_decoded_bytes:
            raise MailTooComplex(
                f"more than {self.limits.max_total_decoded_bytes} bytes of content"
            )


def _decoded_size_bound(part: Message, encoded: str) -> int:
    """At least the decoded size of a part, from its encoded text, without decoding it."""
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64" or cte in ("x-uuencode", "uuencode", "uue", "x-uue"):
        significant = len(encoded) - sum(encoded.count(ch) for ch in "\r\n\t =")
        return significant * 3 // 4
    if cte == "quoted-printable":
        # every '=' (an escape or a soft line break) stands for at least 3 characters
        return len(encoded) - 2 * encoded.count("=")
    return len(encoded)


def _declared_size(part: Message) -> int | None:
    size = part.get_param("size", header="content-disposition")
    if isinstance(size, str) and size.strip().isdigit() and len(size.strip()) < 20:
        return int(size.strip())
    return None


def _payload(part: Message, budget: _Budget) -> bytes:
    encoded = part.get_payload()
    if not isinstance(encoded, str):
        return b""
    declared = _declared_size(part)
    if declared is not None and declared > budget.limits.max_attachment_bytes:
        raise MailTooComplex(f"a part declared larger than {budget.limits.max_attachment_bytes}")
    budget.spend(_decoded_size_bound(part, encoded))
    try:
        data = part.get_payload(decode=True)
    except Exception:  # a decoder's bug must not lose the mail: keep the bytes as sent
        data = None
    if not isinstance(data, bytes):
        data = _raw_bytes(encoded)
    if len(data) > budget.limits.max_attachment_bytes:
        raise MailTooComplex(f"a part larger than {budget.limits.max_attachment_bytes} bytes")
    return data


def _content_type(part: Message) -> str:
    ctype = part.get_content_type()
    return ctype if len(ctype) <= 100 else "application/octet-stream"


def _readable(part: Message, header: str) -> Message:
    """``part``, or a stand-in holding just ``header`` decoded, when the sender wrote raw 8-bit
    bytes in it: the stdlib would turn those into U+FFFD before reading parameters."""
    raw = _first(part, header)
    if raw is None or raw.isascii():
        return part
    stand_in = Message()
    stand_in[header] = decode_bytes(_raw_bytes(raw), "utf-8")
    return stand_in


def _param(part: Message, name: str, header: str = "content-type") -> str | None:
    value = _readable(part, header).get_param(name, header=header)
    if isinstance(value, tuple):  # RFC 2231 (charset, language, value) left undecoded
        value = decode_bytes(_raw_bytes(value[2]), value[0])
    return value if isinstance(value, str) else None


_UNSAFE_FILENAME = re.compile(r"[\x00-\x1f\x7f]+")


def _filename(part: Message, fallback_charset: str | None) -> str | None:
    try:
        name = _readable(part, "content-disposition").get_filename()
    except Exception:  # the RFC 2231 decoding of a malformed parameter
        name = None
    if name is None:
        name = _param(part, "name")
    if not name:
        return None
    name = decode_header_value(name, fallback_charset)
    # A name is shown and offered for download, never used as a path: still, no directories.
    name = re.split(r"[/\\]", name)[-1]
    name = _UNSAFE_FILENAME.sub("_", name).strip(" .")
    return name[:255] or None


_META_CHARSET = re.compile(rb"<meta[^>]{0,300}?charset\s*=\s*[\"']?([A-Za-z0-9._:-]{1,40})", re.I)


def _text_of(part: Message, data: bytes) -> str:
    charset = _param(part, "charset")
    if charset is None and part.get_content_subtype() == "html":
        found = _META_CHARSET.search(data[:4096])
        if found:
            charset = found.group(1).decode("ascii")
    return decode_bytes(data, charset).replace("\r\n", "\n").replace("\r", "\n")


def _message_bytes(part: Message) -> bytes:
    payload = part.get_payload()
    inner = payload[0] if isinstance(payload, list) and payload else None
    if isinstance(inner, Message):
        try:
            return inner.as_bytes()
        except Exception:  # regenerating a malformed message can fail; keep what we can
            return b""
    return _raw_bytes(payload) if isinstance(payload, str) else b""


def _delivery_status_text(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload
    blocks = [b for b in payload if isinstance(b, Message)] if isinstance(payload, list) else []
    return "\n\n".join("\n".join(f"{k}: {v}" for k, v in block.items()) for block in blocks)


# --- HTML ---------------------------------------------------------------------------------------

_SAFE_TAGS = frozenset(
    {
        *("a", "abbr", "b", "blockquote", "br", "caption", "center", "cite", "code", "col"),
        *("colgroup", "dd", "del", "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4"),
        *("h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "ol", "p", "pre", "q", "s"),
        *("small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td"),
        *("tfoot", "th", "thead", "tr", "tt", "u", "ul"),
    }
)
_SAFE_ATTRIBUTES: Mapping[str, frozenset[str]] = {
    "*": frozenset({"style", "dir", "lang", "title", "align"}),
    "a": frozenset({"href"}),
    "img": frozenset({"src", "alt", "width", "height"}),
    "font": frozenset({"color", "size", "face"}),
    "table": frozenset({"width", "border", "cellpadding", "cellspacing", "bgcolor"}),
    "td": frozenset({"width", "colspan", "rowspan", "valign", "bgcolor"}),
    "th": frozenset({"width", "colspan", "rowspan", "valign", "bgcolor"}),
    "col": frozenset({"span", "width"}),
    "colgroup": frozenset({"span", "width"}),
    "ol": frozenset({"start", "type"}),
    "blockquote": frozenset({"type"}),
}
# Layout and colour only: nothing that positions over the page or fetches (url() in
# background-image and the like).
_SAFE_STYLES = frozenset(
    {
        *("color", "background-color", "font", "font-family", "font-size", "font-style"),
        *("font-weight", "text-align", "text-decoration", "vertical-align", "white-space"),
        *("line-height", "margin", "margin-top", "margin-bottom", "margin-left"),
        *("margin-right", "padding", "padding-top", "padding-bottom", "padding-left"),
        *("padding-right", "border", "border-top", "border-bottom", "border-left"),
        *("border-right", "border-collapse", "width", "height", "list-style-type"),
    }
)


def _attribute_filter(tag: str, attribute: str, value: str) -> str | None:
    # Images only from the web: cid: parts are not served, data: URLs can be huge and odd, and
    # a relative URL means nothing here.
    if tag == "img" and attribute == "src":
        return value if value.strip().lower().startswith(("https://", "http://")) else None
    return value


_CLEANER = nh3.Cleaner(
    tags=set(_SAFE_TAGS),
    clean_content_tags={"script", "style", "title", "head", "template", "textarea", "noscript"},
    attributes={tag: set(names) for tag, names in _SAFE_ATTRIBUTES.items()},
    attribute_filter=_attribute_filter,
    url_schemes={"http", "https", "mailto", "tel"},
    url_relative="deny",
    link_rel="noopener noreferrer nofollow",
    set_tag_attribute_values={"a": {"target": "_blank"}},
    filter_style_properties=set(_SAFE_STYLES),
)


_RUN_SPECIALS = re.compile(r"[&\xa0<]")
_MAX_RUN_SPECIALS = 1000


def _break_runs(html: str) -> str:
    """``html`` with an empty ``<span></span>`` before every thousandth ``&`` or no-break space
    of a stretch without ``<``: html5ever's time is quadratic in their number in one text run
    (or attribute value), and a tag ends the run. Real mail never has that many in a row."""
    if html.count("&") + html.count("\xa0") < _MAX_RUN_SPECIALS:
        return html
    out: list[str] = []
    last = count = 0
    for match in _RUN_SPECIALS.finditer(html):
        if match.group() == "<":
            count = 0
            continue
        count += 1
        if count >= _MAX_RUN_SPECIALS:
            out.append(html[last : match.start()])
            out.append("<span></span>")
            last, count = match.start(), 0
    out.append(html[last:])
    return "".join(out)


# Comments and declarations count as tags (the cap bounds the cleaner's work) but open nothing.
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)|<[!?/]")
_VOID = frozenset(
    {
        *("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"),
        *("param", "source", "track", "wbr", "basefont", "bgsound", "frame", "keygen"),
    }
)
# A start tag of one of these closes an open element of the same name inside the nearest
# container (``<li><li>`` are siblings, ``<ul><li><ul><li>`` nest), as the HTML parser does.
_SELF_SIBLINGS = frozenset({"p", "li", "dt", "dd", "option", "tr", "td", "th", "a"})
_CONTAINERS = frozenset({"ul", "ol", "dl", "table", "select", "td", "th", "body", "html"})


def _cut_depth(html: str, max_tags: int, max_depth: int) -> tuple[str, bool]:
    """``html`` cut before its ``max_tags``-th tag or before the tag that opens an element
    ``max_depth`` deep, and whether it was cut. html5ever walks its stack of open elements
    for most tags, so its time grows with tags times depth: 20,000 nested tags took 1.7 s
    where 20,000 flat ones take 10 ms. The depth here follows the parser's rules closely
    enough (void elements, end tags of open elements, implied sibling ends) that real mail,
    a few dozen deep, is never cut by it."""
    stack: list[str] = []
    for count, match in enumerate(_TAG.finditer(html), start=1):
        if count > max_tags:
            return html[: match.start()], True
        if match.group(2) is None:
            continue
        name = match.group(2).lower()
        if match.group(1):
            if name in stack:
                del stack[len(stack) - 1 - stack[::-1].index(name) :]
            continue
        if name in _VOID:
            continue
        if name in _SELF_SIBLINGS:
            for index in range(len(stack) - 1, -1, -1):
                if stack[index] == name:
                    del stack[index:]
                    break
                if stack[index] in _CONTAINERS:
                    break
        stack.append(name)
        if len(stack) > max_depth:
            return html[: match.start()], True
    return html, False


def sanitise_html(html: str, max_tags: int = 20_000, max_depth: int = 1_000) -> tuple[str, bool]:
    """(safe HTML, whether it was cut): an allow-list of tags and attributes, no scripts,
    styles, event handlers or javascript: URLs, images only over http(s), links that open
    apart and pass no referrer. HTML with more than ``max_tags`` tags, or elements nested
    more than ``max_depth`` deep, is cut at that tag."""
    html, cut = _cut_depth(html, max_tags, max_depth)
    return _CLEANER.clean(_break_runs(html)), cut


_BLOCKS = frozenset(
    {
        *("p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote"),
        *("pre", "table", "ul", "ol", "hr", "dd", "dt", "dl", "center", "caption"),
    }
)


class _TextRenderer(HTMLParser):
    """Plain text of sanitised HTML, with ``> `` before each line of a ``<blockquote>`` so the
    reply splitter reads Apple Mail's and Gmail's quoting as it reads plain-text quoting."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[tuple[int, str]] = []
        self._current: list[str] = []
        self._depth = 0
        self._pre = 0

    def _end_line(self, force: bool = False) -> None:
        text = "".join(self._current)
        self._current = []
        text = text.replace("\xa0", " ")
        if not self._pre:
            text = " ".join(text.split())
        if text or force:
            self.lines.append((self._depth, text))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self._end_line(force=True)
        elif tag in _BLOCKS:
            self._end_line()
        if tag == "blockquote":
            self._depth += 1
        elif tag == "pre":
            self._pre += 1
        elif tag == "li":
            self._current.append("- ")
        elif tag in ("td", "th") and self._current:
            self._current.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCKS:
            self._end_line()
        if tag == "blockquote":
            self._depth = max(0, self._depth - 1)
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag == "p":
            self.lines.append((self._depth, ""))

    def handle_data(self, data: str) -> None:
        self._current.append(data)

    def text(self) -> str:
        self._end_line()
        out: list[str] = []
        for depth, line in self.lines:
            prefix = "> " * depth
            out.append((prefix + line).rstrip() if line else prefix.rstrip())
        return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")


def html_to_text(sanitised_html: str) -> str:
    """Plain text of HTML that ``sanitise_html`` produced (well-formed, no comments)."""
    renderer = _TextRenderer()
    renderer.feed(sanitised_html)
    renderer.close()
    return renderer.text()


# --- the reply and its history ------------------------------------------------------------------

_VERBS = (
    *("wrote", "schrieb", "a écrit", "escribió", "ha scritto", "schreef", "napisał"),
    *("napisała", "skrev", "kirjoitti", "írta", "napsal", "napsala", "escreveu"),
    # "писал" also finds написал, написала and The Bat!'s "Вы писали"
    *("пишет", "писал", "yazd\u0131", "έγραψε", "写道", "寫道", "작성"),
)
_SEPARATOR = re.compile(
    r"[-_=]{2,}\s*(?:original message|ursprüngliche nachricht|message d'origine"
    r"|mensaje original|messaggio originale|oorspronkelijk bericht|originalmeddelande"
    r"|oprindelig meddelelse|opprinnelig melding|alkuperäinen viesti|wiadomość oryginalna"
    r"|исходное сообщение|původní zpráva|mensagem original|forwarded message"
    r"|weitergeleitete nachricht|message transféré|mensaje reenviado|original-nachricht)"
    r"\s*[-_=]{2,}",
)
_RULE = re.compile(r"[-_]{10,}")
_FROM_KEYS = frozenset(
    {
        *("from", "von", "de", "van", "da", "från", "fra", "od", "от", "lähettäjä"),
        *("feladó", "发件人", "寄件者", "差出人", "보낸 사람", "afzender", "remetente"),
    }
)
_OTHER_KEYS = frozenset(
    {
        *("sent", "date", "to", "subject", "cc", "gesendet", "datum", "an", "betreff"),
        *("envoyé", "à", "objet", "enviado", "para", "asunto", "fecha", "inviato", "a"),
        *("oggetto", "data", "verzonden", "aan", "onderwerp", "skickat", "till", "ämne"),
        *("sendt", "til", "emne", "wysłano", "do", "temat", "отправлено", "кому", "тема"),
        *("дата", "odesláno", "komu", "předmět", "enviada", "assunto", "lähetetty"),
        *("vastaanottaja", "aihe", "发送时间", "收件人", "主题", "日期", "送信日時"),
        *("宛先", "件名", "보낸 날짜", "받는 사람", "제목", "elküldve", "címzett", "tárgy"),
    }
)
_MAX_MARKER_LINE = 500  # attribution and header lines are short; longer lines are text


def _quoted(line: str) -> bool:
    return line.lstrip().startswith(">")


def _is_attribution(line: str) -> bool:
    text = line.strip()
    if not text or len(text) > _MAX_MARKER_LINE or text[-1] not in ":\uff1a":
        return False
    if not any(ch.isdigit() for ch in text):  # a date or a time: "On Monday I wrote:" is text
        return False
    folded = text.casefold()
    if any(verb in folded for verb in _VERBS):
        return True
    last = text[:-1].rsplit(None, 1)[-1] if text[:-1].strip() else ""
    return "@" in last  # "3 Mar 2025, 10:12, Bob <bob@example.com>:" (Gmail in Russian)


def _header_key(line: str) -> str | None:
    text = line.strip().lstrip("*").strip()
    for index, ch in enumerate(text[:40]):
        if ch in ":\uff1a":
            key = text[:index].strip(" *").casefold()
            return key or None
    return None


def _header_block_at(lines: list[str], i: int) -> bool:
    if len(lines[i]) > _MAX_MARKER_LINE or _header_key(lines[i]) not in _FROM_KEYS:
        return False
    seen = 0
    for j in range(i + 1, len(lines)):
        line = lines[j]
        if not line.strip():
            continue
        seen += 1
        if seen > 6:
            break
        if len(line) <= _MAX_MARKER_LINE and _header_key(line) in _OTHER_KEYS:
            return True
    return False


_OPENERS = ("on ", "am ", "le ", "el ", "il ", "op ", "den ", "w dniu ", "dne ", "em ")


def _attribution_start(lines: list[str], i: int) -> int:
    """Where the attribution ending on line ``i`` starts: Gmail wraps a long one, often
    inside the address ("On Mon, … Bob Smith <" / "bob@example.com> wrote:")."""
    before = lines[i - 1].strip() if i > 0 else ""
    if not before or _quoted(before) or len(before) > 300:
        return i
    if before.casefold().startswith(_OPENERS) or before.endswith(("<", "(")):
        return i - 1
    return i


def _boundary(lines: list[str]) -> tuple[int, bool] | None:
    """(index of the first line of the quoted history, whether everything after it is
    history) - the first attribution, separator or quoted-header block outside quotes."""
    for i, line in enumerate(lines):
        if _quoted(line) or not line.strip():
            continue
        if _is_attribution(line):
            return _attribution_start(lines, i), False
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if (
            following
            and not _quoted(following)
            and len(line) <= 300
            and len(following) <= 300
            and not _is_attribution(following)
            and _is_attribution(f"{line.strip()} {following.strip()}")
        ):
            return i, False  # an attribution wrapped onto two lines
        stripped = line.strip()
        if len(stripped) <= 200 and _SEPARATOR.fullmatch(stripped.casefold()):
            return i, True
        if _header_block_at(lines, i):
            start = i
            before = i - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            if before >= 0 and _RULE.fullmatch(lines[before].strip()):
                start = before  # Outlook's line of underscores above "From:"
            return start, True
    return None


def split_reply(text: str) -> tuple[str, str]:
    """(the new text of a reply, the quoted history), from plain text.

    The history starts at the first line outside quotes that introduces it: an attribution
    ("On … wrote:", "Am … schrieb …:" and others, with a date in it), a separator
    ("-----Original Message-----") or an Outlook header block ("From: …" followed by "Sent: …",
    in several languages); quoted lines (``>``) at the end of the new text belong to it too. A
    reply written below the quote (bottom-posting) is found after the last quoted line.

    mail-parser-reply was tried and not used: its header patterns backtrack, and a 30 KB line
    of "On On On…" took two seconds (100 KB: minutes). This is line by line, linear.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    found = _boundary(lines)
    cut, all_history = found if found is not None else (len(lines), False)
    while cut > 0 and (not lines[cut - 1].strip() or _quoted(lines[cut - 1])):
        cut -= 1  # quoted lines just above the history are part of it
    new, history = lines[:cut], lines[cut:]
    if not all_history and not any(line.strip() for line in new):
        # Nothing above the quote: the reply may be below it (bottom-posting).
        quoted = [i for i, line in enumerate(lines) if _quoted(line)]
        if quoted and any(line.strip() for line in lines[quoted[-1] + 1 :]):
            new, history = lines[quoted[-1] + 1 :], lines[: quoted[-1] + 1]
    elif found is None:
        # A quote at the top and only the reply below it, without an attribution.
        first = next((i for i, line in enumerate(lines) if line.strip()), 0)
        quoted = [i for i, line in enumerate(lines) if _quoted(line)]
        if quoted and quoted[0] == first:
            block_end = first
            while block_end < len(lines) and (
                _quoted(lines[block_end]) or not lines[block_end].strip()
            ):
                block_end += 1
            if quoted[-1] < block_end < len(lines):
                new, history = lines[block_end:], lines[:block_end]
    return "\n".join(new).strip(), "\n".join(history).strip()


# --- the message --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedMail:
    message_id: str | None  # "<id@host>", as in the header
    in_reply_to: str | None
    references: tuple[str, ...]
    subject: str
    from_address: str  # "" when there is none
    from_name: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    reply_to: tuple[str, ...]
    date: datetime | None  # always aware; UTC when the message gave no zone
    headers: Mapping[str, str]  # NOISE_HEADERS and our own X-PortalHub-*, lower-case names
    content_type: str  # of the whole message, e.g. "multipart/report"
    report_type: str | None  # multipart/report's report-type, e.g. "delivery-status"
    part_types: tuple[str, ...]  # every entity's content type, in order
    text: str  # the text/plain body, or the text of the HTML body
    html_sanitised: str | None
    new_text: str  # the reply without the quoted history
    quoted_text: str
    attachments: tuple[Attachment, ...]
    truncated: bool = False  # text or HTML cut at ``Limits.max_text_chars``/``max_html_*``
    # Authentication-Results and Received fields, (lower-case name, value) from the top, for
    # ``authresults.trusted_results``: where they stand tells the trusted server's apart.
    trace: tuple[tuple[str, str], ...] = ()
    # The subject and text of each attached message (a forward as ``.eml``), for reply codes
    # and nothing else: what a customer forwards may carry the code of the mail it answers.
    attached_texts: tuple[str, ...] = ()

    @property
    def auto_submitted(self) -> str | None:
        return self.headers.get("auto-submitted")

    @property
    def precedence(self) -> str | None:
        return self.headers.get("precedence")

    @property
    def return_path(self) -> str | None:
        return self.headers.get("return-path")

    @property
    def portalhub(self) -> Mapping[str, str]:
        """Our own headers on it (a mail we sent, coming back)."""
        return {k: v for k, v in self.headers.items() if k.startswith(OUR_HEADER_PREFIX)}


def _all(message: Message, name: str) -> list[str]:
    """The raw values of a header (``Message.get`` would wrap 8-bit ones in ``Header``)."""
    name = name.lower()
    return [v for k, v in message.raw_items() if k.lower() == name and isinstance(v, str)]


def _first(message: Message, name: str) -> str | None:
    values = _all(message, name)
    return values[0] if values else None


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(_FOLD.sub("", value).strip())
    except Exception:  # anything a sender may write in Date: - a missing date is fine
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _is_attachment(part: Message, filename: str | None) -> bool:
    disposition = part.get_content_disposition()
    if disposition == "attachment":
        return True
    return part.get_content_type() not in ("text/plain", "text/html") or (
        filename is not None and disposition != "inline"
    )


def parse(raw: bytes, limits: Limits | None = None) -> ParsedMail:
    """``raw`` read into a ``ParsedMail``; ``MailTooComplex`` when it exceeds ``limits``, or
    when the standard library cannot read it at all: such mail is refused (552 over SMTP,
    "refused" and kept for an admin from IMAP), never retried for ever."""
    limits = limits or Limits()
    try:
        return from_message(message_from_bytes(raw, limits), limits)
    except MailTooComplex:
        raise
    except (LookupError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        # Shapes found by fuzzing: a codec that is no charset (idna, undefined) decoding an
        # 8-bit payload inside the stdlib, RFC 2231 continuations mixed with a plain
        # parameter (decode_params raises TypeError), a NUL in a charset name.
        raise MailTooComplex(f"unreadable MIME ({type(exc).__name__})") from exc


# What reading an attached message may raise, besides the limits (see ``parse``): such a
# message is passed over, the mail around it is not lost.
_UNREADABLE = (
    MailTooComplex,
    LookupError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    RecursionError,
)
MAX_ATTACHED_MESSAGES = 5  # read for codes; a forward carries one, a digest a few
MAX_ATTACHED_TEXT_CHARS = 64 << 10


def _attached_texts(inner: list[Message], limits: Limits) -> tuple[str, ...]:
    """The subject and text of the attached messages: an attached ``message/rfc822`` (parsed
    with the message around it, so inside its limits) or an ``.eml`` file sent as bytes (parsed
    here, under the same limits). Each is read as a message of its own, without its own
    attachments; one that cannot be read is passed over."""
    texts: list[str] = []
    for entity in inner[:MAX_ATTACHED_MESSAGES]:
        try:
            mail = from_message(entity, limits, nested=True)
        except _UNREADABLE:
            continue
        parts = [mail.subject, mail.text[:MAX_ATTACHED_TEXT_CHARS]]
        if mail.html_sanitised:
            parts.append(mail.html_sanitised[:MAX_ATTACHED_TEXT_CHARS])
        texts.append("\n".join(parts))
    return tuple(texts)


def _eml_attachment(part: Attachment, limits: Limits) -> Message | None:
    """An attachment that is a message sent as a file (``forward.eml``,
    ``application/octet-stream``), parsed; None for any other file or one that does not
    parse."""
    if part.content_type in ("message/rfc822", "message/global"):
        return None  # read from the parsed entity already
    if not part.filename.lower().endswith(".eml") or not part.data:
        return None
    try:
        return message_from_bytes(part.data, limits)
    except _UNREADABLE:
        return None


def from_message(
    message: Message, limits: Limits | None = None, nested: bool = False
) -> ParsedMail:
    """A ``ParsedMail`` of what ``message_from_bytes`` returned. ``nested``: an attached
    message, read for its text only (its own attached messages are not read again)."""
    limits = limits or Limits()
    top_charset = _param(message, "charset")
    budget = _Budget(limits)

    plains: list[str] = []
    htmls: list[str] = []
    attachments: list[Attachment] = []
    part_types: list[str] = []
    within: set[int] = set()  # ids of the entities inside an attached message or report
    attached_messages: list[Message] = []
    for entity, _depth in _entities(message):
        if id(entity) in within:
            continue  # stored as part of the message or report they are in
        ctype = _content_type(entity)
        part_types.append(ctype)
        filename = _filename(entity, top_charset)
        if entity.get_content_maintype() == "message" and entity.is_multipart():
            # message/rfc822 and the like hold a message; message/delivery-status holds blocks
            # of fields. Either is kept whole, as one attachment.
            within.update(id(e) for e, _ in _entities(entity) if e is not entity)
            if ctype == "message/delivery-status":
                data = _delivery_status_text(entity).encode("utf-8", errors="surrogateescape")
                filename = filename or "delivery-status.txt"
            else:
                data = _message_bytes(entity)
                filename = filename or "message.eml"
                payload = entity.get_payload()
                if (
                    not nested
                    and isinstance(payload, list)
                    and payload
                    and isinstance(payload[0], Message)
                ):
                    attached_messages.append(payload[0])
            budget.spend(len(data))
        elif entity.is_multipart():
            continue
        else:
            data = _payload(entity, budget)
        if not _is_attachment(entity, filename):
            (plains if ctype == "text/plain" else htmls).append(_text_of(entity, data))
            continue
        content_ids = _message_ids(_first(entity, "content-id") or "")
        attachments.append(
            Attachment(
                clean_name(filename or "") or _default_name(ctype, len(attachments)),
                ctype,
                len(data),
                data,
                inline=entity.get_content_disposition() == "inline" or bool(content_ids),
                content_id=content_ids[0][1:-1] if content_ids else None,
            )
        )
        if len(attachments) > limits.max_attachments:
            raise MailTooComplex(f"more than {limits.max_attachments} attachments")

    truncated = False
    html_sanitised: str | None = None
    if htmls:
        html = "\n".join(htmls)
        if len(html) > limits.max_html_chars:
            html, truncated = html[: limits.max_html_chars], True
        html_sanitised, cut = sanitise_html(html, limits.max_html_tags)
        html_sanitised = xml_safe(html_sanitised)  # nh3 writes "&#1;" out as U+0001
        truncated = truncated or cut
    text = "\n\n".join(p.strip("\n") for p in plains if p.strip())
    if not text and html_sanitised:
        text = html_to_text(html_sanitised)  # character references decoded: "&#1;" is U+0001
    text = xml_safe(text)
    if len(text) > limits.max_text_chars:
        text, truncated = text[: limits.max_text_chars], True
    new_text, quoted_text = split_reply(text)
    if not nested:
        for part in attachments:
            if len(attached_messages) >= MAX_ATTACHED_MESSAGES:
                break
            eml = _eml_attachment(part, limits)
            if eml is not None:
                attached_messages.append(eml)

    senders = _addresses(_all(message, "from"), top_charset)
    headers: dict[str, str] = {}
    trace: list[tuple[str, str]] = []
    for name, value in message.raw_items():  # items() wraps 8-bit values in Header objects
        key = name.strip().lower()
        if (key in NOISE_HEADERS or key.startswith(OUR_HEADER_PREFIX)) and key not in headers:
            headers[key] = decode_header_value(value, top_charset).strip()[:1000]
        if key in TRACE_HEADERS and len(trace) < MAX_TRACE_FIELDS and isinstance(value, str):
            trace.append((key, _FOLD.sub(" ", value[:MAX_TRACE_CHARS]).strip()))
    message_ids = _message_ids(_first(message, "message-id") or "")
    in_reply_to = _message_ids(_first(message, "in-reply-to") or "")
    references = [i for v in _all(message, "references") for i in _message_ids(v)]
    subject = _first(message, "subject")
    return ParsedMail(
        message_id=message_ids[0] if message_ids else None,
        in_reply_to=in_reply_to[0] if in_reply_to else None,
        references=tuple(references[-100:]),  # the newest; a long thread's list is endless
        subject=clean_name(decode_header_value(subject, top_charset)) if subject else "",
        from_address=senders[0].address if senders else "",
        from_name=senders[0].name if senders else "",
        to=tuple(a.address for a in _addresses(_all(message, "to"), top_charset)),
        cc=tuple(a.address for a in _addresses(_all(message, "cc"), top_charset)),
        reply_to=tuple(a.address for a in _addresses(_all(message, "reply-to"), top_charset)),
        date=_date(_first(message, "date")),
        headers=headers,
        content_type=_content_type(message),
        report_type=(_param(message, "report-type") or "").strip().lower() or None,
        part_types=tuple(part_types),
        text=text,
        html_sanitised=html_sanitised,
        new_text=new_text,
        quoted_text=quoted_text,
        attachments=tuple(attachments),
        truncated=truncated,
        trace=tuple(trace),
        attached_texts=_attached_texts(attached_messages, limits),
    )


_EXTENSIONS: Mapping[str, str] = {
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/csv": ".csv",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "application/pdf": ".pdf",
    "message/delivery-status": ".txt",
    "text/rfc822-headers": ".txt",
}


def _default_name(content_type: str, index: int) -> str:
    return f"attachment-{index + 1}{_EXTENSIONS.get(content_type, '.bin')}"
