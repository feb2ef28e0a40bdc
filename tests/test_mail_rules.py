"""The mail bridge's pure rules: admins' subject rules, leads from unknown senders, addresses."""

from __future__ import annotations

import time

import pytest

from server.mailbridge.rules import (
    MAX_SUBJECT_CHARS,
    SubjectRule,
    apply_rules,
    domain_of,
    lead_allowed,
    normal_address,
    sender_matches,
    validate_rule,
)

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
