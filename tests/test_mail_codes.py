"""Reply codes: signing and verifying, reading them back out of what mail clients make of them."""

from __future__ import annotations

import time  # bounds on super-linear work count CPU time, so a busy machine cannot fail them

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.crm.rules import RECORD_TYPES
from server.mailbridge import codes
from server.mailbridge.codes import (
    ALPHABET,
    CODE_LENGTH,
    CodeRef,
    body_line,
    code_from_address,
    find_codes,
    in_text,
    issue,
    normalise,
    plus_local_part,
    strip_reply_prefixes,
    subject_with_code,
    verify,
    without_breaks,
)

SECRET = b"s" * 32
OTHER = b"o" * 32
ACTIVITY = "65f1c0ffee0123456789abcd"
REF = CodeRef("deal", ACTIVITY)
KEYS = {"A": SECRET}


def code() -> str:
    return issue(REF, "A", SECRET)


# --- issue and verify ---------------------------------------------------------------------------


@pytest.mark.parametrize("record_type", RECORD_TYPES)
def test_round_trip_for_every_record_type(record_type: str) -> None:
    ref = CodeRef(record_type, ACTIVITY)
    assert verify(issue(ref, "A", SECRET), KEYS) == ref


def test_extreme_ids_round_trip() -> None:
    for activity in ("0" * 24, "f" * 24):
        ref = CodeRef("lead", activity)
        assert verify(issue(ref, "Z", SECRET), {"Z": SECRET}) == ref


def test_code_is_short_and_in_the_alphabet() -> None:
    token = code()
    assert len(token) == CODE_LENGTH <= 40
    assert set(token) <= set(ALPHABET)
    assert token[0] == "A"  # the key id


def test_codes_differ_by_activity_type_and_key() -> None:
    codes = {
        issue(CodeRef("deal", ACTIVITY), "A", SECRET),
        issue(CodeRef("lead", ACTIVITY), "A", SECRET),
        issue(CodeRef("deal", "65f1c0ffee0123456789abce"), "A", SECRET),
        issue(CodeRef("deal", ACTIVITY), "B", SECRET),
    }
    assert len(codes) == 4


def test_every_changed_character_is_refused() -> None:
    token = code()
    for i, ch in enumerate(token):
        for other in "0Z7":
            if other != ch:
                assert verify(token[:i] + other + token[i + 1 :], KEYS) is None


def test_wrong_secret_and_unknown_key_id_are_refused() -> None:
    token = code()
    assert verify(token, {"A": OTHER}) is None
    assert verify(token, {"B": SECRET}) is None
    assert verify(token, {}) is None


def test_old_key_verifies_while_it_is_kept() -> None:
    old = issue(REF, "A", SECRET)
    new = issue(REF, "B", OTHER)
    both = {"A": SECRET, "B": OTHER}
    assert verify(old, both) == REF
    assert verify(new, both) == REF
    assert verify(old, {"B": OTHER}) is None  # retired
    assert verify(new, {"b": OTHER}) == REF  # key ids compare like codes


def test_case_and_ambiguous_characters_are_forgiven() -> None:
    token = code()
    assert verify(token.lower(), KEYS) == REF
    spelt = token.replace("1", "l").replace("0", "O")
    assert verify(spelt, KEYS) == REF
    spelt = token.replace("1", "I").replace("0", "o")
    assert verify(spelt, KEYS) == REF
    assert normalise(f"  {token.lower()} ") == token


@pytest.mark.parametrize(
    "token",
    ["", "A", "A" * (CODE_LENGTH - 1), "A" * (CODE_LENGTH + 1), "U" * CODE_LENGTH, "!" * 37],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert verify(token, KEYS) is None


def test_a_u_is_never_read_as_a_symbol() -> None:
    token = code()
    assert verify(token[:5] + "U" + token[6:], KEYS) is None


def test_bad_inputs_to_issue_raise() -> None:
    with pytest.raises(ValueError):
        CodeRef("ticket", ACTIVITY)
    with pytest.raises(ValueError):
        CodeRef("deal", "not-an-object-id")
    with pytest.raises(ValueError):
        CodeRef("deal", ACTIVITY.upper())
    with pytest.raises(ValueError):
        issue(REF, "AB", SECRET)
    with pytest.raises(ValueError):
        issue(REF, "U", SECRET)
    with pytest.raises(ValueError):
        issue(REF, "A", b"short")


def test_record_type_numbers_cover_the_crm() -> None:
    for record_type in RECORD_TYPES:
        CodeRef(record_type, ACTIVITY)


# --- in subjects and bodies ---------------------------------------------------------------------


def test_subject_with_code_appends_and_replaces() -> None:
    token = code()
    subject = subject_with_code("Your offer", token)
    assert subject == f"Your offer [CRM-{token}]"
    other = issue(CodeRef("lead", ACTIVITY), "A", SECRET)
    again = subject_with_code(f"Re: {subject}", other)
    assert again == f"Re: Your offer [CRM-{other}]"
    assert subject_with_code("", token) == in_text(token)


@pytest.mark.parametrize(
    "subject",
    [
        "Re: Your offer {c}",
        "AW: Your offer {c}",
        "VS: Your offer {c}",
        "RE[2]: Your offer {c}",
        "Fwd: FW: Re: Your offer {c}",
        "Re: Your offer (revised) {c} - please check",
        "{c}",
        "Re:Your offer{c}",
        "WG: Antw: {c} thanks",
    ],
)
def test_found_in_subjects(subject: str) -> None:
    token = code()
    text = subject.format(c=in_text(token))
    assert find_codes(text) == [token]
    assert verify(find_codes(text)[0], KEYS) == REF


def test_found_lower_cased_and_with_other_dashes() -> None:
    token = code()
    assert find_codes(f"re: offer [crm-{token.lower()}]") == [token]
    assert find_codes(f"Offer [CRM\u2013{token}]") == [token]
    assert find_codes(f"Offer CRM-{token}") == [token]


def test_found_in_quoted_plain_text() -> None:
    token = code()
    text = f"Yes, fine.\n\nOn Mon, Bob wrote:\n> Hello\n> {body_line(token)}\n>\n"
    assert find_codes(text) == [token]
    assert find_codes(f">> > {in_text(token)}") == [token]


@pytest.mark.parametrize("cut", [1, 4, 5, 20, CODE_LENGTH - 1])
def test_found_when_a_quoting_client_wrapped_it_onto_two_lines(cut: int) -> None:
    token = code()
    text = f"[CRM-{token}]"
    at = len("[CRM-") + cut
    for joint in ("\n> ", "\r\n>> ", " \n", "\n  > > "):
        wrapped = f"Fine.\n\n> Subject: Your quote {text[:at]}{joint}{text[at:]}\n> Hello"
        assert find_codes(wrapped) == [token], repr(wrapped)
    html = f"<blockquote>Subject: Your quote {text[:at]}<br>\n{text[at:]}</blockquote>"
    assert find_codes(html) == [token]


def test_wrapping_makes_no_code_of_two_halves_of_different_codes() -> None:
    token, other = code(), issue(CodeRef("lead", ACTIVITY), "A", SECRET)
    found = find_codes(f"[CRM-{token[:10]}\n> {other[10:]}]")
    assert all(verify(c, KEYS) is None for c in found)


def test_found_in_html() -> None:
    token = code()
    line = body_line(token)
    for html in (
        f"<p>{line}</p>",
        f"<p>Please keep:&nbsp;[CRM-{token}]&nbsp;</p>",
        f"<blockquote type='cite'><div>{line}</div></blockquote>",
        f"<p>&#91;CRM-{token}&#93;</p>",
        f"<p>[CRM-<span>{token}</span>]</p>",
    ):
        assert find_codes(html) == [token], html


def test_not_found_inside_longer_tokens_or_when_cut() -> None:
    token = code()
    assert find_codes(f"XCRM-{token}") == []
    assert find_codes(f"[CRM-{token}X]") == []
    assert find_codes(f"[CRM-{token[:-1]}]") == []


def test_several_codes_each_once_in_order() -> None:
    first = code()
    second = issue(CodeRef("lead", ACTIVITY), "A", SECRET)
    text = f"{in_text(first)} {in_text(second)} {in_text(first.lower())}"
    assert find_codes(text) == [first, second]


def test_body_line_is_visible_text_with_the_code() -> None:
    token = code()
    line = body_line(token)
    assert in_text(token) in line and "<" not in line


# --- plus addresses -----------------------------------------------------------------------------


def test_plus_address() -> None:
    token = code()
    local = plus_local_part("crm", token)
    assert code_from_address(local, "crm") == token
    assert code_from_address(local.upper(), "crm") == token
    assert code_from_address(local.lower(), "CRM") == token
    assert code_from_address("crm", "crm") is None
    assert code_from_address(f"sales+{token}", "crm") is None
    assert code_from_address("crm+hello", "crm") is None
    assert verify(code_from_address(local, "crm") or "", KEYS) == REF


# --- reply prefixes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "bare"),
    [
        ("Re: Offer", "Offer"),
        ("RE: RE: Offer", "Offer"),
        ("re:Offer", "Offer"),
        ("AW: WG: Offer", "Offer"),
        ("Aw: Offer", "Offer"),
        ("VS: Offer", "Offer"),
        ("Sv: Offer", "Offer"),
        ("Antw: Offer", "Offer"),
        ("Fwd: Offer", "Offer"),
        ("FW: Offer", "Offer"),
        ("TR: Offer", "Offer"),
        ("RE[2]: Offer", "Offer"),
        ("Re(3): Fwd: Offer", "Offer"),
        ("Re [12] : Offer", "Offer"),
        ("回复\uff1aOffer", "Offer"),  # with a full-width colon
        ("Offer: Re: details", "Offer: Re: details"),
        ("Regarding the offer", "Regarding the offer"),
        ("Review: offer", "Review: offer"),
        ("", ""),
    ],
)
def test_strip_reply_prefixes(subject: str, bare: str) -> None:
    assert strip_reply_prefixes(subject) == bare


def test_hostile_subjects_take_linear_time() -> None:
    started = time.process_time()
    assert strip_reply_prefixes("Re" + " " * 50_000 + "x").endswith("x")
    assert strip_reply_prefixes("Re: " * 50_000 + "x") == "x"
    assert find_codes("[CRM-" * 50_000) == []
    subject_with_code("CRM-" + "A" * 100_000, code())
    assert time.process_time() - started < 1


# What the fast paths of ``find_codes`` replace, compared with the patterns themselves on text
# made of the characters that matter to them (quote markers, line ends, dashes, a letter whose
# lower case is longer, tags and entities).
_NEAR_CODES = st.text(alphabet=list("crmCRM-_ \t\r\n>0189ABXZabxz\u0130<&;\u2013"), max_size=80)
_A_CODE = st.text(alphabet=list(ALPHABET + "crmilo"), min_size=CODE_LENGTH, max_size=CODE_LENGTH)


@given(_NEAR_CODES)
def test_joining_wrapped_lines_does_what_the_pattern_did(text: str) -> None:
    assert without_breaks(text) == codes._BREAK.sub("", text)


@given(_NEAR_CODES, _A_CODE, _NEAR_CODES)
def test_codes_are_looked_for_where_the_pattern_finds_them(
    before: str, code: str, after: str
) -> None:
    for text in (before, f"{before}CRM-{code}{after}", f"{before}crm{code}CRM-{code}{after}"):
        expected = [m.span() for m in codes._IN_TEXT.finditer(text)]
        assert [m.span() for m in codes._codes_in(text)] == expected


def test_a_code_wrapped_in_a_long_quoted_mail_is_found() -> None:
    code = issue(REF, "A", SECRET)
    quoted = "\n".join(f"> line {n} of what we wrote before" for n in range(300))
    text = f"Thanks!\n\n{quoted}\n> Ref: [CRM-{code[:20]}\n>  {code[20:]}]\n{quoted}"
    assert find_codes(text) == [code]
    assert find_codes(text.replace("CRM", "crn")) == []
