"""The text rules (``server/text.py``) as pure functions, the XMPP serialiser that applies them,
and a check that every free-text field of every request model carries one of them."""

from __future__ import annotations

import time  # bounds on super-linear work count CPU time, so a busy machine cannot fail them
import types
import typing
import unicodedata
import xml.etree.ElementTree as ET
from typing import Annotated, Any, get_args, get_origin

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from server.channels.hub import ConnectAuth, Heartbeat, SubscribeRequest, Typing
from server.text import (
    BIDI_CONTROLS,
    NAME_TEXT,
    REPLACEMENT,
    XML_TEXT,
    check_name,
    clean_name,
    describe,
    find_name_illegal,
    find_xml_illegal,
    is_xml_char,
    xml_safe,
)
from server.web.routes.all import api
from server.xmpp.stanza import child, element
from server.xmpp.xmlstream import STREAM_NS, StreamError, XmlStreamParser, serialize

# Any code point, surrogates included, with the interesting ones drawn often.
SPECIAL = "\x00\x01\x07\x08\x09\x0a\x0b\x0c\x0d\x1b\x1f\x7f\x85\x9f\u200e\u200f\u2028\u2029"
SPECIAL += "".join(BIDI_CONTROLS) + "\ud800\udfff\ufffe\uffff\ufffd\U0001f600"
texts = st.text(
    alphabet=st.one_of(st.sampled_from(SPECIAL), st.characters(codec=None), st.just(" ")),
    max_size=60,
)


def xml_char_by_the_book(point: int) -> bool:
    """XML 1.0 (Fifth Edition), production [2] Char."""
    return (
        point in (0x9, 0xA, 0xD)
        or 0x20 <= point <= 0xD7FF
        or 0xE000 <= point <= 0xFFFD
        or 0x10000 <= point <= 0x10FFFF
    )


def test_is_xml_char_is_the_xml_production_for_every_code_point() -> None:
    wrong = [p for p in range(0x110000) if is_xml_char(chr(p)) != xml_char_by_the_book(p)]
    assert wrong == []


@given(texts)
def test_find_xml_illegal_finds_the_first_offender(text: str) -> None:
    offenders = [c for c in text if not xml_char_by_the_book(ord(c))]
    assert find_xml_illegal(text) == (offenders[0] if offenders else None)


@given(texts)
def test_xml_safe_replaces_exactly_the_illegal_characters(text: str) -> None:
    safe = xml_safe(text)
    assert find_xml_illegal(safe) is None
    assert len(safe) == len(text)
    for before, after in zip(text, safe, strict=True):
        assert after == (before if xml_char_by_the_book(ord(before)) else REPLACEMENT)
    assert xml_safe(text, "") == "".join(c for c in text if xml_char_by_the_book(ord(c)))


def test_xml_safe_returns_clean_text_itself() -> None:
    text = "nothing to do here, \u00e9\U0001f600"
    assert xml_safe(text) is text


def name_ok_by_the_book(char: str) -> bool:
    return (
        xml_char_by_the_book(ord(char))
        and unicodedata.category(char) not in ("Cc", "Zl", "Zp")
        and char not in BIDI_CONTROLS
    )


@given(texts)
def test_the_name_rule_is_the_xml_rule_and_more(text: str) -> None:
    offenders = [c for c in text if not name_ok_by_the_book(c)]
    assert find_name_illegal(text) == (offenders[0] if offenders else None)
    if find_name_illegal(text) is None:
        assert find_xml_illegal(text) is None


def test_the_name_rule_keeps_the_marks_a_right_to_left_name_needs() -> None:
    for name in ("שלום\u200f", "\u200eA-1", "محمد\u061c", "👩\u200d💻", "Zoë\u00a0Ann", "a\u200cb"):
        assert find_name_illegal(name) is None, name


@given(texts)
def test_clean_name_always_makes_a_valid_name(text: str) -> None:
    name = clean_name(text)
    assert find_name_illegal(name) is None
    assert name == name.strip(" ")
    assert clean_name(name) == name.strip()


@given(texts.filter(lambda t: find_name_illegal(t) is None))
def test_clean_name_leaves_a_valid_name_alone(text: str) -> None:
    assert clean_name(text) == text.strip()


def test_clean_name_joins_the_words_around_what_it_drops() -> None:
    assert clean_name("Ev\u202eil\x07 Corp") == "Evil Corp"
    assert clean_name("line one\r\n\tline two") == "line one line two"
    assert clean_name("\x00") == ""


@pytest.mark.parametrize(
    "text", [" " * 200_000 + "a", "\x07 " * 100_000 + "a", "a" + " " * 200_000 + "\x07"]
)
def test_clean_name_takes_linear_time(text: str) -> None:
    # (mail headers are a stranger's; a regex around the spaces took minutes here)
    started = time.process_time()
    clean_name(text)
    assert time.process_time() - started < 2


def test_describe_names_the_character_and_its_kind() -> None:
    assert describe("\x00") == "U+0000 (a control character)"
    assert describe("\x85") == "U+0085 (a control character)"
    assert describe("\u202e") == "U+202E (a bidirectional control)"
    assert describe("\u2028") == "U+2028 (a line break)"
    assert describe("\ufffe") == "U+FFFE (a noncharacter)"
    assert describe("\ud800") == "U+D800 (a lone surrogate)"


def test_the_pydantic_markers_refuse_with_a_stable_type_and_the_character() -> None:
    text = TypeAdapter(Annotated[str, XML_TEXT])
    name = TypeAdapter(Annotated[str, NAME_TEXT])
    assert text.validate_python("tab\tand\nnewline \u202e") == "tab\tand\nnewline \u202e"
    with pytest.raises(ValidationError) as refused:
        text.validate_python("bell\x07")
    [error] = refused.value.errors()
    assert error["type"] == "text_character" and "U+0007 (a control character)" in error["msg"]
    with pytest.raises(ValidationError) as refused:
        name.validate_python("Anna\tB")
    [error] = refused.value.errors()
    assert error["type"] == "name_character" and "U+0009" in error["msg"]
    with pytest.raises(ValueError, match=r"U\+202E \(a bidirectional control\)"):
        check_name("\u202eevil")


# the serialiser: the second line -------------------------------------------------------------

HEADER = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    f"xmlns:stream='{STREAM_NS}' to='localhost' version='1.0'>"
).encode()


def read_back(data: bytes) -> ET.Element:
    got: list[ET.Element] = []
    parser = XmlStreamParser(lambda _a: None, got.append, lambda: None, max_stanza_bytes=1 << 30)
    parser.feed(HEADER + data)  # raises StreamError unless well-formed
    [stanza] = got
    return stanza


@pytest.mark.parametrize(
    "reference", ["&#0;", "&#1;", "&#x7;", "&#x1B;", "&#xFFFE;", "&#xFFFF;", "&#xD800;", "\x07"]
)
def test_from_clients_such_characters_are_not_well_formed_even_as_references(
    reference: str,
) -> None:
    """So no stanza from a Jabber client carries one: the stream ends (RFC 6120, 4.9.3.13)."""
    stanza = f"<message to='bob@localhost' type='chat'><body>a{reference}b</body></message>"
    with pytest.raises(StreamError) as ended:
        read_back(stanza.encode())
    assert ended.value.condition == "not-well-formed"


@given(texts, texts)
def test_any_stored_text_serialises_to_a_well_formed_stanza(body: str, name: str) -> None:
    stanza = element("message", {"type": "chat", "to": "bob@localhost", "name": name})
    child(stanza, "body", text=body)
    again = read_back(serialize(stanza))
    # (a parser reads a CR in text as a line feed: XML 1.0, 2.11)
    expected = xml_safe(body).replace("\r\n", "\n").replace("\r", "\n")
    assert (again.findtext("{jabber:client}body") or "") == expected
    assert again.get("name") == xml_safe(name)


def test_a_nul_in_a_roster_name_is_replaced_not_dropped() -> None:
    item = element("item", {"jid": "alice@localhost", "name": "An\x00na"}, ns="jabber:iq:roster")
    child(item, "group", text="Sales\x1b")
    assert (
        serialize(item)
        == (
            '<item xmlns="jabber:iq:roster" jid="alice@localhost" name="An\ufffdna">'
            "<group>Sales\ufffd</group></item>"
        ).encode()
    )


# every free-text field carries a rule ---------------------------------------------------------

# Request fields that hold no free text, and why they need no rule of their own.
NOT_FREE_TEXT = {
    "password": "hashed, never shown or sent; SASLprep has its own rules",
    "login": "a pattern of letters, digits, '.', '_' and '-'",
    "currency": "a pattern of three letters",
    "code": "a pattern of a-z, 0-9 and '_'",
    "number": "a pattern of digits and punctuation",
    "phones": "(DuplicateProbe) the same pattern",
    "time_zone": "must name an IANA zone",
    "client_id": "a pattern of letters, digits and '._:-'",
    "stream": "must name a stream the caller may join",
    "token": "compared with stored token hashes only",
    "to": "user ids (SendMessage), looked up",
    "to_department": "a department id, looked up",
    "up_to": "a message id, looked up",
    "custom_fields": "values are checked by crm.rules.clean_custom_values (test_xml_text)",
    "since": "stream names, looked up",
}


def is_identifier(name: str) -> bool:
    return name == "id" or name.endswith(("_id", "_ids"))


def unruled_strings(
    tp: Any, path: str, field: str, meta: tuple[Any, ...], seen: set[type], out: list[str]
) -> None:
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *more = get_args(tp)
        unruled_strings(inner, path, field, meta + tuple(more), seen, out)
        return
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp in seen:
            return
        seen.add(tp)
        for name, info in tp.model_fields.items():
            unruled_strings(
                info.annotation, f"{tp.__name__}.{name}", name, tuple(info.metadata), seen, out
            )
        return
    if tp is str or tp is Any:
        ruled = any(m is XML_TEXT or m is NAME_TEXT for m in meta)
        if not ruled and not is_identifier(field) and field not in NOT_FREE_TEXT:
            out.append(path)
        return
    keep = meta if origin in (typing.Union, types.UnionType) else ()
    for arg in get_args(tp):
        unruled_strings(arg, path + "[]", field, keep, seen, out)


def test_every_free_text_field_of_every_request_carries_a_text_rule() -> None:
    models = {op.body for op in api.operations if op.body is not None}
    models |= {ConnectAuth, SubscribeRequest, Heartbeat, Typing}  # Socket.IO client events
    missing: list[str] = []
    for model in sorted(models, key=lambda m: m.__name__):
        unruled_strings(model, model.__name__, "", (), set(), missing)
    assert missing == []


def test_the_check_finds_a_field_without_a_rule() -> None:
    class Sloppy(BaseModel):
        note: str
        tags: list[Annotated[str, XML_TEXT]]
        owner_id: str

    missing: list[str] = []
    unruled_strings(Sloppy, "Sloppy", "", (), set(), missing)
    assert missing == ["Sloppy.note"]
