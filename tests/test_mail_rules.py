"""The mail bridge's pure rules: admins' subject rules, leads from unknown senders, addresses."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from server.mailbridge.ingress import accepts
from server.mailbridge.outbox import HeaderInjection, compose
from server.mailbridge.pipeline import is_postmaster
from server.mailbridge.rules import (
    MAX_SUBJECT_CHARS,
    SubjectRule,
    apply_rules,
    domain_of,
    lead_allowed,
    normal_address,
    sender_matches,
    split_name,
    validate_rule,
)
from server.mailbridge.service import fill, placeholder_values, reply_subject

# --- subject rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        r"Order #(\d+)",
        r"Ticket \[(?P<code>[A-Z]{2}-\d{4,8})\]",
        r"(?i)invoice\s+no\.?\s*(\d+)",
        r"(\d{2}-){3}(\d+)",
        r"(?:RE|AW):\s*Case (\w+)",
        r"Case (\d+)(?: \(urgent\))?",
        r"[(]ref ([a-z0-9]+)[)]+",
        r"\(ref (\w+)\)+",
        r"Deal: ([^,]+),",
    ],
)
def test_valid_rules(pattern: str) -> None:
    validate_rule(pattern)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("(a" + "b" * 600 + ")", "at most"),
        (r"Order #\d+", "capturing group"),
        (r"Order #(?:\d+)", "capturing group"),
        (r"Order #(\d+", "not a valid"),
        (r"(a+)+$", "repeated group"),
        (r"(.*)*x", "repeated group"),
        (r"(\w+\s?)*$", "repeated group"),
        (r"((a|b)+c)*(d)", "repeated group"),
        (r"(?:x+)*(y)", "repeated group"),
        (r"(a{1,5})+", "repeated group"),
        (r"(?P<code>(?:\d+-)+)", "repeated group"),
    ],
)
def test_invalid_rules(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        validate_rule(pattern)


def test_apply_rules_first_match_wins() -> None:
    rules = [
        SubjectRule("r1", r"Ticket #(\d+)", "deal"),
        SubjectRule("r2", r"Order (?P<code>[A-Z]+-\d+)", "company", "order_no"),
        SubjectRule("r3", r"Order (\w+)", "lead"),
    ]
    assert apply_rules(rules, "Re: Ticket #4711 broken") == (rules[0], "4711")
    assert apply_rules(rules, "Order AB-12 shipped") == (rules[1], "AB-12")
    assert apply_rules(rules, "Order xyz") == (rules[2], "xyz")
    assert apply_rules(rules, "Hello") is None
    assert apply_rules([], "Order AB-12") is None


def test_apply_rules_takes_the_first_group_that_matched() -> None:
    rule = SubjectRule("r", r"(?:Case (\d+)|Ticket (\d+))", "deal")
    assert apply_rules([rule], "Ticket 9") == (rule, "9")


def test_apply_rules_skips_bad_rules() -> None:
    bad = SubjectRule("bad", r"(a+)+$", "deal")
    broken = SubjectRule("broken", r"(unclosed", "deal")
    good = SubjectRule("good", r"#(\d+)", "deal")
    assert apply_rules([bad, broken, good], "a" * 40 + "! #5") == (good, "5")


def test_slow_pattern_is_bounded_by_the_timeout() -> None:
    # Passes the static check (alternation, not nesting) but backtracks exponentially.
    slow = SubjectRule("slow", r"^(a|aa)+$", "deal")
    validate_rule(slow.pattern)
    after = SubjectRule("after", r"(!)", "deal")
    started = time.perf_counter()
    assert apply_rules([slow, after], "a" * 60 + "!", timeout=0.05) == (after, "!")
    assert time.perf_counter() - started < 0.5


def test_long_subjects_are_cut() -> None:
    rule = SubjectRule("r", r"#(\d+)$", "deal")
    assert apply_rules([rule], "x" * (MAX_SUBJECT_CHARS - 3) + "#12") == (rule, "12")
    assert apply_rules([rule], "x" * MAX_SUBJECT_CHARS + "#12") is None
    polynomial = SubjectRule("p", r"(\w*)\w*\w*\w*!", "deal")
    started = time.perf_counter()
    apply_rules([polynomial], "a" * 1_000_000)
    assert time.perf_counter() - started < 0.5


# --- addresses ----------------------------------------------------------------------------------


def test_normal_address_and_domain() -> None:
    assert normal_address("  <Bob+News@Example.COM> ") == "bob+news@example.com"
    assert normal_address("bob@example.com.") == "bob@example.com"
    assert domain_of("Bob@Mail.Example.com") == "mail.example.com"
    assert domain_of("no-at-sign") == ""
    assert domain_of("@example.com") == ""


def test_sender_matches() -> None:
    emails = ["Anna@Client.example", "anna.private@mail.example"]
    assert sender_matches("anna@client.example", emails)
    assert sender_matches("<ANNA@CLIENT.EXAMPLE>", emails)
    assert sender_matches("anna+crm@client.example", emails)
    assert not sender_matches("bob@client.example", emails)
    assert not sender_matches("anna@other.example", emails)
    assert not sender_matches("", emails)
    assert not sender_matches("anna@client.example", [])


# --- leads --------------------------------------------------------------------------------------

EXCEPTIONS = ["@ourcompany.example", "partner.example", "noreply@shop.example"]


@pytest.mark.parametrize(
    ("sender", "allowed"),
    [
        ("new.client@client.example", True),
        ("colleague@ourcompany.example", False),
        ("Colleague@OURCOMPANY.example", False),
        ("someone@mail.ourcompany.example", False),  # a subdomain
        ("someone@notourcompany.example", True),
        ("anyone@partner.example", False),
        ("noreply@shop.example", False),
        ("sales@shop.example", True),
        ("", False),
        ("not-an-address", False),
    ],
)
def test_lead_exceptions(sender: str, allowed: bool) -> None:
    assert lead_allowed(sender, EXCEPTIONS, recent_count=0, max_per_period=3) is allowed


def test_lead_rate_limit() -> None:
    sender = "new.client@client.example"
    assert lead_allowed(sender, [], recent_count=2, max_per_period=3)
    assert not lead_allowed(sender, [], recent_count=3, max_per_period=3)
    assert not lead_allowed(sender, [], recent_count=0, max_per_period=0)
    assert lead_allowed(sender, ["", "  "], recent_count=0, max_per_period=1)


# --- names of senders ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("display", "address", "expected"),
    [
        ("Carl Client", "carl@client.test", ("Carl", "Client")),
        ("Client, Carl", "", ("Carl", "Client")),
        ("  Anna   Maria  van der Berg ", "", ("Anna Maria", "van der Berg")),
        ("Jean-Luc de la Fontaine", "", ("Jean-Luc", "de la Fontaine")),
        ("Carl", "", ("Carl", "")),
        ('"Carl Client (Sales)"', "", ("Carl", "Client")),
        ("Carl Client via Partners List", "", ("Carl", "Client")),
        ("carl@client.test", "carl@client.test", ("", "")),
        ("Carl <carl@client.test>", "", ("", "")),
        ("CARL@client.test", "carl@client.test", ("", "")),
        ("", "", ("", "")),
        ("Acme, Inc, Ltd", "", ("Acme Inc", "Ltd")),
        ("Ёжик Туманов", "", ("Ёжик", "Туманов")),
    ],
)
def test_a_senders_display_name_is_split_into_first_and_last(
    display: str, address: str, expected: tuple[str, str]
) -> None:
    assert split_name(display, address) == expected


def test_split_names_are_cut_to_the_fields_length() -> None:
    first, last = split_name("A" * 300 + " " + "B" * 300)
    assert len(first) == 100 and len(last) == 100


# --- addresses taken, and mail composed --------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "taken"),
    [
        ("crm@portal.test", True),
        ("CRM+abc@Portal.Test", True),
        ("Postmaster", True),  # RFC 5321 4.5.1: without a domain too
        ("<postmaster>", True),
        ("postmaster@portal.test", True),
        ("POSTMASTER@hub.test", True),  # the portal's own domain
        ("postmaster@elsewhere.test", False),
        ("postmasters@portal.test", False),
        ("sales@portal.test", False),
        ("crm@elsewhere.test", False),
    ],
)
def test_the_listener_takes_the_inbox_and_postmaster_only(address: str, taken: bool) -> None:
    assert accepts(address, "crm@portal.test", ("hub.test",)) is taken


def test_postmaster_recipients_are_told_apart() -> None:
    assert is_postmaster("Postmaster") and is_postmaster("postmaster@portal.test")
    assert not is_postmaster("crm@portal.test") and not is_postmaster("crm+postmaster@p.test")


def test_composed_mail_dates_in_utc_and_continues_the_thread() -> None:
    raw = compose(
        sender_name="Mary",
        from_address="crm@portal.test",
        reply_to="crm+CODE@portal.test",
        to=["carl@client.test"],
        cc=["cleo@client.test"],
        subject="Re: offer",
        text="Fine",
        html=None,
        message_id="<new@portal.test>",
        origin="portal.test",
        attachments=[],
        in_reply_to="<theirs@client.test>",
        references=["<first@portal.test>", "<theirs@client.test>"],
        date=datetime(2026, 11, 23, 22, 40, 25, tzinfo=timezone(timedelta(hours=1))),
    )
    head = raw.split(b"\n\n", 1)[0].decode()
    assert "Date: Mon, 23 Nov 2026 21:40:25 +0000" in head
    assert "In-Reply-To: <theirs@client.test>" in head
    assert "References: <first@portal.test> <theirs@client.test> <new@portal.test>" in head
    assert "Cc: cleo@client.test" in head and "Bcc" not in head
    with pytest.raises(HeaderInjection):
        compose(
            sender_name="Mary",
            from_address="crm@portal.test",
            reply_to="crm+CODE@portal.test",
            to=["carl@client.test"],
            subject="x",
            text="",
            html=None,
            message_id="<new@portal.test>",
            origin="portal.test",
            attachments=[],
            references=["<a@b>\r\nBcc: victim@x.test"],
        )


def test_a_reply_subject_drops_prefixes_and_codes() -> None:
    assert reply_subject("AW: RE: Your quote [CRM-ABC]") == "Re: Your quote [CRM-ABC]"
    token = "0" + "1" * 36
    assert reply_subject(f"RE: Your quote [CRM-{token}]") == "Re: Your quote"
    assert reply_subject("") == "Re:"


def test_placeholders_of_a_deal_are_its_contacts() -> None:
    deal = {"type": "deal", "title": "Big order"}
    contact = {"type": "contact", "first_name": "Carl", "last_name": "Client"}
    values = placeholder_values(deal, contact, {"login": "mary", "email": "m@p.test"})
    assert values["record"] == {"title": "Big order", "first_name": "Carl", "last_name": "Client"}
    assert values["contact"]["name"] == "Carl Client"
    assert fill("Dear {{record.first_name}}, {{ user.email }}{{x.y}}", values) == (
        "Dear Carl, m@p.test"
    )
    lead = {"type": "lead", "title": "L", "first_name": "Nora", "last_name": ""}
    assert placeholder_values(lead, None, {"login": "x"})["record"]["first_name"] == "Nora"
    assert placeholder_values({"type": "company", "title": "Acme"}, None, {"login": "x"})[
        "record"
    ] == {
        "title": "Acme",
        "first_name": "",
        "last_name": "",
    }
