"""Incremental parsing of an XMPP stream into stanzas, refusing what XMPP forbids.

RFC 6120 section 11.1 restricts XML on streams: no DOCTYPE (so no entity declarations and no
billion laughs), no comments, no processing instructions. Any of them ends the stream with
``<restricted-xml/>``. Stanzas are built as ElementTree elements with Clark-notation names
(``{namespace}local``); a stanza larger than the limit ends the stream with
``<policy-violation/>`` before it is fully buffered.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any
from xml.parsers import expat

from server.text import xml_safe

STREAM_NS = "http://etherx.jabber.org/streams"
STREAM_TAG = f"{{{STREAM_NS}}}stream"
RECENT_BYTES = 1024  # raw input kept from before the current chunk, to look back at tokens
_END_TAG_THEN_SPACE = re.compile(rb"(?:</[^>]*>)?[ \t\r\n]*")
# Expat errors that mean restricted XML rather than broken XML (RFC 6120 11.1): a reference
# to an entity that is not predefined, an XML declaration (a PI, to expat) mid-stream.
_RESTRICTED_ERRORS = {
    expat.errors.codes[expat.errors.XML_ERROR_UNDEFINED_ENTITY],
    expat.errors.codes[expat.errors.XML_ERROR_MISPLACED_XML_PI],
}
_INVALID_TOKEN = expat.errors.codes[expat.errors.XML_ERROR_INVALID_TOKEN]


class StreamError(Exception):
    """Ends the stream with the given RFC 6120 condition."""

    def __init__(self, condition: str, text: str = "", app: ET.Element | None = None) -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text
        self.app = app  # an application-specific condition (RFC 6120 4.9.4), if any


def _clark(name: str) -> str:
    # expat with namespace_separator=" " reports "uri local"
    uri, sep, local = name.rpartition(" ")
    return f"{{{uri}}}{local}" if sep else name


class XmlStreamParser:
    """Feed bytes; get ``on_open(attrs)``, ``on_stanza(element)``, ``on_close()`` callbacks."""

    def __init__(
        self,
        on_open: Callable[[dict[str, str]], None],
        on_stanza: Callable[[ET.Element], None],
        on_close: Callable[[], None],
        *,
        max_stanza_bytes: int,
    ) -> None:
        self._on_open = on_open
        self._on_stanza = on_stanza
        self._on_close = on_close
        self.max_stanza_bytes = max_stanza_bytes
        self._parser = expat.ParserCreate(encoding="UTF-8", namespace_separator=" ")
        self._parser.buffer_text = True
        self._parser.ordered_attributes = False
        self._parser.StartElementHandler = self._start
        self._parser.EndElementHandler = self._end
        self._parser.CharacterDataHandler = self._text
        self._parser.StartDoctypeDeclHandler = self._forbidden
        self._parser.EntityDeclHandler = self._forbidden
        self._parser.CommentHandler = self._forbidden
        self._parser.ProcessingInstructionHandler = self._forbidden
        self._parser.XmlDeclHandler = self._xml_decl
        self._parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        self._depth = 0
        self._stack: list[ET.Element] = []
        self._stanza_start = 0
        self._mark = 0  # where the unfinished thing began: what was fed after it is buffered
        self._last_end = 0  # where the last stanza's end tag began (or its empty tag ended)
        self._fed = 0
        self._recent = b""  # the last chunk fed, and up to RECENT_BYTES from before it
        self._recent_start = 0
        self.closed = False

    def retarget(
        self,
        on_open: Callable[[dict[str, str]], None],
        on_stanza: Callable[[ET.Element], None],
        on_close: Callable[[], None],
    ) -> None:
        """Hand what is parsed from now on to others (a resumed session takes the stream)."""
        self._on_open, self._on_stanza, self._on_close = on_open, on_stanza, on_close

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises StreamError. Callbacks run synchronously from here."""
        if self.closed:
            return
        kept = self._recent[-RECENT_BYTES:]
        self._recent_start = self._fed - len(kept)
        self._recent = kept + data
        self._fed += len(data)
        try:
            self._parser.Parse(data, False)
        except expat.ExpatError as exc:
            raise StreamError(self._condition_of(exc), str(exc)) from None
        # Nothing unfinished may grow without bound while we wait for its end: neither a
        # stanza nor a tag (a start tag with megabytes of attributes is still at depth 1).
        if self._fed - self._mark > self.max_stanza_bytes:
            raise StreamError("policy-violation", "stanza too large")

    def idle(self) -> bool:
        """Whether nothing but whitespace was fed after the last complete stanza."""
        start = self._last_end - self._recent_start
        return (
            self._depth == 1
            and start >= 0
            and _END_TAG_THEN_SPACE.fullmatch(self._recent, start) is not None
        )

    def _condition_of(self, exc: expat.ExpatError) -> str:
        if exc.code in _RESTRICTED_ERRORS:
            return "restricted-xml"
        # A DOCTYPE or ENTITY declaration inside the stream is an invalid token to expat,
        # reported just after its "<!".
        at = self._parser.ErrorByteIndex - self._recent_start
        if exc.code == _INVALID_TOKEN and b"<!" in self._recent[max(at - 2, 0) : at + 2]:
            return "restricted-xml"
        return "not-well-formed"

    def _forbidden(self, *args: Any) -> None:
        raise StreamError("restricted-xml", "DOCTYPE, entities, comments and PIs are not allowed")

    def _xml_decl(self, version: str | None, encoding: str | None, standalone: int) -> None:
        if encoding is not None and encoding.upper() != "UTF-8":
            raise StreamError("unsupported-encoding")

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        tag = _clark(name)
        attributes = {_clark(k): v for k, v in attrs.items()}
        self._depth += 1
        if self._depth == 1:
            if tag != STREAM_TAG:
                raise StreamError("invalid-namespace", "expected <stream:stream>")
            self._on_open(attributes)
            return
        if self._depth == 2:
            self._stanza_start = self._mark = self._parser.CurrentByteIndex
            element = ET.Element(tag, attributes)
        else:
            element = ET.SubElement(self._stack[-1], tag, attributes)
        if self._depth > 64:
            raise StreamError("policy-violation", "nesting too deep")
        self._stack.append(element)

    def _end(self, name: str) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.closed = True
            self._on_close()
            return
        element = self._stack.pop()
        if self._depth == 1:
            end = self._last_end = self._mark = self._parser.CurrentByteIndex
            if end - self._stanza_start > self.max_stanza_bytes:
                raise StreamError("policy-violation", "stanza too large")
            self._on_stanza(element)

    def _text(self, data: str) -> None:
        if self._depth < 2 or not self._stack:
            if data.strip():
                raise StreamError("not-well-formed", "text outside stanzas")
            # Whitespace keep-alives are consumed: what is pending starts after them. (Expat
            # reports buffered text at its start or at the next event; never count past _fed.)
            end = min(self._parser.CurrentByteIndex + len(data), self._fed)
            self._mark = max(self._mark, end)
            return
        element = self._stack[-1]
        if len(element):
            last = element[-1]
            last.tail = (last.tail or "") + data
        else:
            element.text = (element.text or "") + data


def serialize(element: ET.Element, default_ns: str = "jabber:client") -> bytes:
    """One stanza as bytes, with ``default_ns`` as the default namespace (no ``ns0:`` noise)."""
    return _Serializer(default_ns).element(element).encode()


def addressed(stanza: ET.Element, default_ns: str = "jabber:client") -> Callable[[str], bytes]:
    """Serialise once, address many: the bytes of ``stanza`` for any value of its ``to``.

    One message goes to every session of a recipient (and a room message to every occupant)
    with only the ``to`` attribute differing; serialising the whole stanza per session cost
    more than writing it."""
    stanza.set("to", "")
    data = serialize(stanza, default_ns)
    # The first ' to=""' is the root's own: values are escaped (no '"' inside one), and the
    # root's start tag comes before any child's.
    at = data.index(b' to=""')
    head, tail = data[:at] + b' to="', b'"' + data[at + 6 :]
    return lambda to: head + _escape_attr(to).encode() + tail


def _escape_text(text: str) -> str:
    # xml_safe: what XML 1.0 cannot carry becomes U+FFFD. Entry points refuse such text, but
    # anything stored before that (or by a path that missed it) would otherwise end the
    # recipient's stream, and again each time it is sent (roster, MAM, offline delivery).
    return xml_safe(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_attr(text: str) -> str:
    return (
        _escape_text(text)
        .replace('"', "&quot;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
        .replace("\t", "&#9;")
    )


class _Serializer:
    """Namespace-aware serialization: each element declares its namespace where it changes.

    Stream-level elements (``features``, ``error``) are written ``stream:``-prefixed, with the
    prefix the stream header declares, as every RFC 6120 example does: clients built on
    loudmouth, Miranda or S22.Xmpp compare the name ``stream:features`` literally and hang on
    an equivalent ``<features xmlns="http://etherx.jabber.org/streams">``.
    """

    def __init__(self, default_ns: str) -> None:
        self.default_ns = default_ns

    def element(self, el: ET.Element, scope_ns: str | None = None) -> str:
        """``scope_ns`` is the default namespace in force where ``el`` is written (None at the
        top: a stanza always names its namespace)."""
        ns, local = _split(el.tag)
        ns = ns if ns is not None else (scope_ns or self.default_ns)
        if ns == STREAM_NS:
            parts = [f"<stream:{local}"]
            name = f"stream:{local}"
            inner_ns = scope_ns if scope_ns is not None else self.default_ns
        else:
            parts = [f"<{local}"]
            name = local
            if ns != scope_ns:
                parts.append(f' xmlns="{_escape_attr(ns)}"')
            inner_ns = ns
        prefixes: dict[str, str] = {}
        for key, value in el.attrib.items():
            attr_ns, attr_local = _split(key)
            if attr_ns is None:
                parts.append(f' {attr_local}="{_escape_attr(value)}"')
            elif attr_ns == "http://www.w3.org/XML/1998/namespace":
                parts.append(f' xml:{attr_local}="{_escape_attr(value)}"')
            else:
                prefix = prefixes.setdefault(attr_ns, f"a{len(prefixes)}")
                parts.append(
                    f' xmlns:{prefix}="{_escape_attr(attr_ns)}"'
                    f' {prefix}:{attr_local}="{_escape_attr(value)}"'
                )
        children = list(el)
        if not children and not el.text:
            parts.append("/>")
        else:
            parts.append(">")
            if el.text:
                parts.append(_escape_text(el.text))
            for item in children:
                parts.append(self.element(item, inner_ns))
                if item.tail:
                    parts.append(_escape_text(item.tail))
            parts.append(f"</{name}>")
        return "".join(parts)


def _split(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return None, tag
