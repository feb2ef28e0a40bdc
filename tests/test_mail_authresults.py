"""Authentication-Results (RFC 8601): reading the fields, choosing the trusted server's, and the
verdict on the sender. Pure functions; the end-to-end test over SMTP is in
test_mail_bridge.py."""

from __future__ import annotations

import time  # bounds on super-linear work count CPU time, so a busy machine cannot fail them

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.mailbridge.authresults import (
    AuthResults,
    Result,
    aligned,
    judge,
    parse_field,
    trusted_results,
)
from server.mailbridge.parsing import parse

MX = "mx.portal.test"


def results(value: str) -> AuthResults:
    parsed = parse_field(value)
    assert parsed is not None
    return parsed


def test_fields_as_real_servers_write_them() -> None:
    # OpenDKIM + OpenDMARC + policyd-spf (Postfix), with comments and a base64 b= tag
    found = results(
        "mx.portal.test;\r\n\tdkim=pass (2048-bit key; unprotected) header.d=client.example "
        "header.i=@client.example header.a=rsa-sha256 header.s=s1 header.b=Ab+/cd==;\r\n"
        "\tspf=pass (mx.portal.test: domain of bounce@client.example designates 192.0.2.7 "
        "as permitted sender) smtp.mailfrom=bounce@client.example;\r\n"
        "\tdmarc=pass (p=reject dis=none) header.from=client.example"
    )
    assert found.authserv_id == MX
    assert [(r.method, r.result) for r in found.results] == [
        ("dkim", "pass"),
        ("spf", "pass"),
        ("dmarc", "pass"),
    ]
    assert found.results[0].props["header.d"] == "client.example"
    assert found.results[0].props["header.b"] == "ab+/cd=="  # '=' inside a value is kept
    assert found.results[1].props["smtp.mailfrom"] == "bounce@client.example"
    # a version, "none", a method version, a quoted reason holding a semicolon, odd spacing
    assert results("MX.Portal.Test 1; none") == AuthResults(MX, ())
    odd = results(
        'mx.portal.test; spf = fail smtp.mailfrom=a@b.example; dkim/1=neutral reason="bad; '
        'really" header.d=b.example (a (nested) comment)'
    )
    assert [(r.method, r.result) for r in odd.results] == [("spf", "fail"), ("dkim", "neutral")]
    assert odd.results[1].props == {"header.d": "b.example"}
    # Microsoft 365 leaves the authserv-id out: such a field can never be a trusted one
    assert (
        parse_field(
            "spf=fail (sender IP is 203.0.113.9) smtp.mailfrom=client.example; "
            "dkim=none (message not signed) header.d=none;dmarc=fail action=quarantine "
            "header.from=client.example;compauth=fail reason=000"
        )
        is None
    )
    unknown = results("mx; compauth=fail reason=000; dmarc=none")
    assert [(r.method, r.result) for r in unknown.results] == [
        ("compauth", "fail"),
        ("dmarc", "none"),
    ]
    assert parse_field("=oops; dmarc=pass") is None
    assert [r.method for r in results("mx; this is not a result; dmarc=pass").results] == ["dmarc"]


@given(st.text(max_size=300))
def test_any_text_parses_or_is_refused_without_raising(value: str) -> None:
    parse_field(value)


def test_hostile_fields_take_bounded_time() -> None:
    for value in (
        "mx;" + "(" * 50_000,
        "mx; dkim=pass " + "a=" * 50_000,
        "mx" + ";" * 100_000,
        'mx; x="' + "\\" * 100_000,
        "mx; " + "k" * 200_000,
    ):
        started = time.process_time()
        parse_field(value)
        assert time.process_time() - started < 0.5


def field(value: str) -> tuple[str, str]:
    return ("authentication-results", value)


RECEIVED = ("received", "from mail.client.example by mx.portal.test with ESMTPS")


def test_only_the_trusted_servers_topmost_fields_count() -> None:
    mine = field("mx.portal.test; dmarc=fail header.from=client.example")
    theirs = field("mx.portal.test; dmarc=pass header.from=client.example")
    other = field("mx.elsewhere.test; dmarc=pass header.from=client.example")
    # an untrusted id is ignored wherever it is
    assert trusted_results([other, RECEIVED], [MX]) == []
    assert [r.authserv_id for r in trusted_results([other, mine, RECEIVED], [MX])] == [MX]
    # the sender's forged field below the trusted server's Received does not count
    found = trusted_results([mine, RECEIVED, theirs], [MX])
    assert [r.results[0].result for r in found] == ["fail"]
    # nor with the server's Received on top (milters insert below it) and another hop after
    found = trusted_results([RECEIVED, mine, ("received", "from x by y"), theirs], [MX])
    assert [r.results[0].result for r in found] == ["fail"]
    # several fields of the trusted server (one per filter) all count
    spf = field("mx.portal.test; spf=fail smtp.mailfrom=client.example")
    assert len(trusted_results([mine, spf, RECEIVED], [MX.upper()])) == 2
    # no trusted ids: nothing is read
    assert trusted_results([mine], []) == []


def verdict_of(*values: str, sender: str = "carl@client.example") -> tuple[bool, str | None]:
    found = [results(v) for v in values]
    verdict = judge(found, sender)
    assert verdict.checked == bool(found)
    return verdict.suspicious, verdict.reason


def test_the_verdict() -> None:
    # DMARC fails: suspicious, whatever else passed
    assert verdict_of(
        "mx; spf=pass smtp.mailfrom=client.example; dmarc=fail (p=none) header.from=client.example"
    ) == (True, "dmarc=fail (header.from=client.example)")
    # a forged pass next to the server's fail changes nothing: a failure wins
    assert verdict_of("mx; dmarc=pass", "mx; dmarc=fail header.from=client.example")[0]
    # SPF fails and no DKIM signature of the From domain passed
    suspicious, reason = verdict_of("mx; spf=fail smtp.mailfrom=evil.example; dkim=none")
    assert suspicious and reason == (
        "spf=fail (smtp.mailfrom=evil.example), and no DKIM signature of client.example passed"
    )
    assert verdict_of("mx; spf=fail; dkim=pass header.d=evil.example")[0]
    assert verdict_of("mx; spf=fail; dkim=fail header.d=client.example")[0]
    # SPF fails but the From domain's signature passed (a forwarder): fine
    assert verdict_of("mx; spf=fail; dkim=pass header.d=client.example") == (False, None)
    assert not verdict_of("mx; spf=fail; dkim=pass header.d=mail.client.example")[0]
    assert not verdict_of("mx; spf=fail; dkim=pass header.i=news@client.example")[0]
    # softfail, neutral, temperror, a broken signature alone: not suspicious
    assert not verdict_of("mx; spf=softfail; dkim=none")[0]
    assert not verdict_of("mx; spf=temperror; dkim=fail header.d=client.example")[0]
    assert not verdict_of("mx; dmarc=pass; spf=pass")[0]
    assert not verdict_of("mx; none")[0]
    # nothing trusted: not checked
    assert judge([], "carl@client.example").checked is False


def test_alignment() -> None:
    assert aligned("client.example", "client.example")
    assert aligned("Mail.Client.Example.", "client.example")
    assert aligned("client.example", "eu.client.example")
    assert not aligned("evilclient.example", "client.example")
    assert not aligned("example", "client.example")  # a bare top-level domain speaks for none
    assert not aligned("", "client.example")
    assert not aligned("client.example", "")


@pytest.mark.parametrize("trusted_on_top", [True, False])
def test_from_raw_mail(trusted_on_top: bool) -> None:
    """The fields as parsing keeps them, in the order of the message."""
    forged = "Authentication-Results: mx.portal.test; dmarc=pass header.from=client.example\r\n"
    server = (
        "Authentication-Results: mx.portal.test;\r\n"
        "  dmarc=fail (p=reject) header.from=client.example\r\n"
    )
    received = "Received: from evil.example by mx.portal.test; Mon, 1 Dec 2026 10:00:00 +0000\r\n"
    top = server + received if trusted_on_top else received + server
    raw = (
        top + "Received: from [10.0.0.1] by evil.example\r\n" + forged + "From: Carl "
        "<carl@client.example>\r\nTo: crm@portal.test\r\nSubject: pay now\r\n\r\nhello\r\n"
    ).encode()
    mail = parse(raw)
    assert [name for name, _ in mail.trace] == [
        name
        for name in (
            ["authentication-results", "received"]
            if trusted_on_top
            else ["received", "authentication-results"]
        )
        + ["received", "authentication-results"]
    ]
    verdict = judge(trusted_results(mail.trace, [MX]), mail.from_address)
    assert verdict.suspicious and verdict.reason is not None and "dmarc=fail" in verdict.reason


def test_result_defaults() -> None:
    assert Result("spf", "pass").props == {}
