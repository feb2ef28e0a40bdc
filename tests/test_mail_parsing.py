"""Incoming mail: MIME to ``ParsedMail`` as real clients write it, charsets, the reply split,
hostile input (MIME bombs, bad HTML), and telling auto-replies and bounces from people."""

# The test data is mail in many scripts: its full-width commas and Cyrillic letters are meant.
# ruff: noqa: RUF001

from __future__ import annotations

import base64
import contextlib
import quopri
import time  # bounds on super-linear work count CPU time, so a busy machine cannot fail them
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.mailbridge.codes import CodeRef, body_line, find_codes, in_text, issue, verify
from server.mailbridge.noise import (
    BounceInfo,
    Noise,
    bounce_info,
    classify,
    failed_in_text,
    is_bounce,
)
from server.mailbridge.parsing import (
    Limits,
    MailTooComplex,
    ParsedMail,
    decode_bytes,
    decode_header_value,
    parse,
    sanitise_html,
    split_reply,
)

SECRET = b"k" * 32
CODE = issue(CodeRef("deal", "65f1c0ffee0123456789abcd"), "A", SECRET)
REF = CodeRef("deal", "65f1c0ffee0123456789abcd")


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("ascii")


def b64(data: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def ew(text: str, charset: str = "utf-8") -> str:
    """One RFC 2047 B encoded word."""
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


# --- realistic replies --------------------------------------------------------------------------

OUTLOOK_PLAIN = (
    "Hello Bob,\n"
    "\n"
    "yes, Tuesday works. Gr\xfc\xdfe nach M\xfcnchen \u2013 see you!\n"
    "\n"
    "Anna\n"
    "\n"
    "-----Original Message-----\n"
    "From: Bob Smith <crm@portal.example>\n"
    "Sent: Monday, March 3, 2025 10:12 AM\n"
    "To: Anna M\xfcller <anna@client.example>\n"
    f"Subject: Offer [CRM-{CODE}]\n"
    "\n"
    "Hi Anna, can we meet next week?\n"
    f"{body_line(CODE)}\n"
)

OUTLOOK_HTML = (
    "<html xmlns:o='urn:schemas-microsoft-com:office:office'><head>"
    '<meta http-equiv="Content-Type" content="text/html; charset=windows-1252">'
    "<style><!-- p.MsoNormal {margin:0cm;} --></style></head>"
    "<body lang=DE><div class=WordSection1>"
    "<p class=MsoNormal>Hello Bob,<o:p></o:p></p><p class=MsoNormal><o:p>&nbsp;</o:p></p>"
    "<p class=MsoNormal>yes, Tuesday works. Gr\xfc\xdfe nach M\xfcnchen \u2013 see you!</p>"
    "<p class=MsoNormal>Anna</p>"
    "<div style='border:none;border-top:solid #E1E1E1 1.0pt;padding:3.0pt 0cm 0cm 0cm'>"
    "<p class=MsoNormal><b>From:</b> Bob Smith &lt;crm@portal.example&gt; <br>"
    "<b>Sent:</b> Monday, March 3, 2025 10:12 AM<br>"
    "<b>To:</b> Anna M\xfcller &lt;anna@client.example&gt;<br>"
    f"<b>Subject:</b> Offer [CRM-{CODE}]</p></div>"
    "<p class=MsoNormal>Hi Anna, can we meet next week?</p>"
    f"<p class=MsoNormal>{body_line(CODE)}</p>"
    "</div></body></html>"
)


def outlook_reply() -> bytes:
    plain = quopri.encodestring(OUTLOOK_PLAIN.encode("cp1252").replace(b"\n", b"\r\n"))
    html = quopri.encodestring(OUTLOOK_HTML.encode("cp1252"))
    head = crlf(
        "From: =?iso-8859-1?Q?Anna_M=FCller?= <Anna@Client.Example>\n"
        "To: CRM <crm@portal.example>\n"
        'Cc: boss@client.example, "Doe, Jane" <jane@client.example>\n'
        f"Subject: AW: Offer [CRM-{CODE}]\n"
        "Date: Tue, 04 Mar 2025 09:30:00 +0100\n"
        "Message-ID: <AM0PR01MB1234@eurprd01.prod.outlook.com>\n"
        "In-Reply-To: <65f1c0ffee0123456789abcd.1a2b3c4d@portal.example>\n"
        "References: <65f1c0ffee0123456789abcd.1a2b3c4d@portal.example>\n"
        "Thread-Topic: Offer\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="_000_AM0PR01MB_"\n'
        "\n"
        "--_000_AM0PR01MB_\n"
        'Content-Type: text/plain; charset="windows-1252"\n'
        "Content-Transfer-Encoding: quoted-printable\n"
        "\n"
    )
    middle = crlf(
        "\n--_000_AM0PR01MB_\n"
        'Content-Type: text/html; charset="windows-1252"\n'
        "Content-Transfer-Encoding: quoted-printable\n"
        "\n"
    )
    return head + plain + middle + html + crlf("\n--_000_AM0PR01MB_--\n")


def test_outlook_reply() -> None:
    mail = parse(outlook_reply())
    assert mail.subject == f"AW: Offer [CRM-{CODE}]"
    assert mail.from_address == "Anna@Client.Example"
    assert mail.from_name == "Anna Müller"
    assert mail.to == ("crm@portal.example",)
    assert mail.cc == ("boss@client.example", "jane@client.example")
    assert mail.message_id == "<AM0PR01MB1234@eurprd01.prod.outlook.com>"
    assert mail.in_reply_to == "<65f1c0ffee0123456789abcd.1a2b3c4d@portal.example>"
    assert mail.references == ("<65f1c0ffee0123456789abcd.1a2b3c4d@portal.example>",)
    assert mail.date == datetime(2025, 3, 4, 8, 30, tzinfo=UTC)
    assert "Grüße nach München – see you!" in mail.text
    assert (
        mail.new_text == "Hello Bob,\n\nyes, Tuesday works. Grüße nach München – see you!\n\nAnna"
    )
    assert mail.quoted_text.startswith("-----Original Message-----")
    assert body_line(CODE) in mail.quoted_text
    assert mail.html_sanitised is not None
    assert "<style" not in mail.html_sanitised and "MsoNormal {" not in mail.html_sanitised
    assert "München" in mail.html_sanitised
    assert mail.attachments == ()
    for text in (mail.subject, mail.text, mail.html_sanitised):
        assert [verify(c, {"A": SECRET}) for c in find_codes(text)] == [REF]


def test_outlook_html_only_splits_at_the_header_block() -> None:
    raw = crlf(
        "From: anna@client.example\n"
        "Subject: RE: Offer\n"
        "Content-Type: text/html; charset=windows-1252\n"
        "Content-Transfer-Encoding: quoted-printable\n\n"
    ) + quopri.encodestring(OUTLOOK_HTML.encode("cp1252"))
    mail = parse(raw)
    assert (
        mail.new_text == "Hello Bob,\n\nyes, Tuesday works. Grüße nach München – see you!\n\nAnna"
    )
    assert mail.quoted_text.startswith("From: Bob Smith <crm@portal.example>\nSent: Monday")
    assert find_codes(mail.text) == [CODE]


def test_new_outlook_plain_text_with_underscore_rule() -> None:
    text = (
        "Sounds good.\n\n"
        "________________________________\n"
        "From: Bob Smith <crm@portal.example>\n"
        "Sent: Monday, 3 March 2025 10:12\n"
        "To: Anna <anna@client.example>\n"
        "Subject: Offer\n\n"
        "Hi Anna\n"
    )
    new, quoted = split_reply(text)
    assert new == "Sounds good."
    assert quoted.startswith("____") and "Hi Anna" in quoted


GMAIL_PLAIN = (
    "Thanks, that works for me. Let's meet on Tuesday.\n"
    "\n"
    "Anna\n"
    "\n"
    "On Mon, 3 Mar 2025 at 10:12, Bob Smith via Portal Hub <\n"
    "crm+" + CODE + "@portal.example> wrote:\n"
    "\n"
    "> Hi Anna,\n"
    "> can we meet next week?\n"
    "> " + body_line(CODE) + "\n"
    ">\n"
)
GMAIL_HTML = (
    '<div dir="ltr">Thanks, that works for me. Let&#39;s meet on Tuesday.<div><br></div>'
    "<div>Anna</div></div><br>"
    '<div class="gmail_quote"><div dir="ltr" class="gmail_attr">On Mon, 3 Mar 2025 at 10:12, '
    "Bob Smith via Portal Hub &lt;crm+" + CODE + "@portal.example&gt; wrote:<br></div>"
    '<blockquote class="gmail_quote" style="margin:0px 0px 0px 0.8ex;border-left:1px solid '
    'rgb(204,204,204);padding-left:1ex"><div>Hi Anna,</div><div>can we meet next week?</div>'
    "<p>" + body_line(CODE) + "</p></blockquote></div>\n"
)


def gmail_reply() -> bytes:
    return crlf(
        "MIME-Version: 1.0\n"
        "References: <a@portal.example>\n <b@portal.example>\n"
        "In-Reply-To: <b@portal.example>\n"
        "From: Anna Client <anna.client@gmail.com>\n"
        "Date: Tue, 4 Mar 2025 09:30:00 +0000\n"
        "Message-ID: <CAJ+abc=def@mail.gmail.com>\n"
        "Subject: Re: Offer\n"
        f"To: Bob Smith via Portal Hub <crm+{CODE}@portal.example>\n"
        'Content-Type: multipart/alternative; boundary="000000000000abcdef"\n'
        "\n"
        "--000000000000abcdef\n"
        'Content-Type: text/plain; charset="UTF-8"\n'
        "\n" + GMAIL_PLAIN + "\n"
        "--000000000000abcdef\n"
        'Content-Type: text/html; charset="UTF-8"\n'
        "\n" + GMAIL_HTML + "\n"
        "--000000000000abcdef--\n"
    )


def test_gmail_reply() -> None:
    mail = parse(gmail_reply())
    assert mail.subject == "Re: Offer"
    assert mail.from_name == "Anna Client"
    assert mail.to == (f"crm+{CODE}@portal.example",)
    assert mail.references == ("<a@portal.example>", "<b@portal.example>")
    assert mail.message_id == "<CAJ+abc=def@mail.gmail.com>"
    assert mail.new_text == "Thanks, that works for me. Let's meet on Tuesday.\n\nAnna"
    assert mail.quoted_text.startswith("On Mon, 3 Mar 2025 at 10:12, Bob Smith")
    assert "> can we meet next week?" in mail.quoted_text
    assert find_codes(mail.text) == [CODE]
    assert mail.html_sanitised is not None and find_codes(mail.html_sanitised) == [CODE]


def test_gmail_html_renders_quotes_as_quoted_text() -> None:
    html, _ = sanitise_html(GMAIL_HTML)
    from server.mailbridge.parsing import html_to_text

    text = html_to_text(html)
    new, quoted = split_reply(text)
    assert new == "Thanks, that works for me. Let's meet on Tuesday.\n\nAnna"
    assert "> Hi Anna," in quoted and "> can we meet next week?" in quoted


APPLE_HTML = (
    '<html><head><meta http-equiv="content-type" content="text/html; charset=utf-8"></head>'
    '<body style="word-wrap: break-word;" dir="auto">Perfect, see you then.<div><br></div>'
    '<div>Anna</div><div><br><blockquote type="cite"><div>On 3. Mar 2025, at 10:12, Bob '
    "Smith &lt;crm@portal.example&gt; wrote:</div><br><div><div>Hi Anna,</div><div>can we "
    f"meet?</div><div>{body_line(CODE)}</div></div></blockquote></div></body></html>"
)


def test_apple_mail_html_only_reply() -> None:
    raw = crlf(
        "From: Anna <anna@icloud.example>\n"
        "Subject: Re: Offer\n"
        "Mime-Version: 1.0 (Mac OS X Mail 16.0)\n"
        "Content-Type: text/html;\n\tcharset=utf-8\n"
        "Content-Transfer-Encoding: quoted-printable\n"
        "\n"
    ) + quopri.encodestring(APPLE_HTML.encode("utf-8"))
    mail = parse(raw)
    assert mail.new_text == "Perfect, see you then.\n\nAnna"
    assert "> Hi Anna," in mail.quoted_text and "> can we meet?" in mail.quoted_text
    assert mail.quoted_text.startswith("> On 3. Mar 2025")
    assert find_codes(mail.text) == [CODE]
    assert mail.html_sanitised is not None and "<blockquote" in mail.html_sanitised


# --- reply splitting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "new"),
    [
        (
            "Ja, gerne.\n\nAm 03.03.2025 um 10:12 schrieb Bob <bob@x.example>:\n> Hallo",
            "Ja, gerne.",
        ),
        (
            "D'accord.\n\nLe lun. 3 mars 2025 à 10:12, Bob <b@x.example> a écrit :\n> Bonjour",
            "D'accord.",
        ),
        ("Vale.\n\nEl lun, 3 mar 2025 a las 10:12, Bob (<b@x.example>) escribió:\n> Hola", "Vale."),
        ("Да.\n\nпн, 3 мар. 2025 г. в 10:12, Bob <b@x.example>:\n> Привет", "Да."),
        (
            "Спасибо, берём.\n\nВы писали 23 ноября 2026 г., 10:00:\n\n> Здравствуйте",
            "Спасибо, берём.",
        ),
        ("Ок.\n\n23.11.2026 10:00, Иван написал:\n> Привет", "Ок."),
        (
            "Passt.\n\nVon: Bob <b@x.example>\nGesendet: Montag, 3. März 2025 10:12\n"
            "An: Anna\nBetreff: Angebot\n\nHallo",
            "Passt.",
        ),
        ("Passt.\n\n-----Ursprüngliche Nachricht-----\nVon: Bob\n\nHallo", "Passt."),
        (
            "Just text.\nFrom: my desk\nNo quotes here.",
            "Just text.\nFrom: my desk\nNo quotes here.",
        ),
        ("On Monday I wrote: nothing.\nStill new.", "On Monday I wrote: nothing.\nStill new."),
        ("Top.\n\n> quoted\n> more\n", "Top."),
        ("> question?\n\nanswer below", "answer below"),
        ("", ""),
    ],
)
def test_split_reply(text: str, new: str) -> None:
    assert split_reply(text)[0] == new


def test_split_reply_keeps_everything() -> None:
    text = "New.\n\nOn Mon, 3 Mar 2025, Bob wrote:\n> old\n"
    new, quoted = split_reply(text)
    assert new == "New." and quoted == "On Mon, 3 Mar 2025, Bob wrote:\n> old"


def test_split_reply_is_linear_on_hostile_text() -> None:
    for line in ("On " * 10_000, "From: x\n" * 20_000, "> " * 100_000, ("-" * 40 + "\n") * 5000):
        started = time.process_time()
        split_reply(line * 3)
        assert time.process_time() - started < 1.0


# --- charsets and headers -----------------------------------------------------------------------

CHARSET_SAMPLES = [
    ("windows-1251", "Привет, это тест. Счёт №5"),
    ("koi8-r", "Привет, это тест"),
    ("iso-2022-jp", "こんにちは、世界。テストです"),
    ("shift_jis", "こんにちは世界、ﾃｽﾄ"),
    ("gb2312", "你好，世界"),
    ("gbk", "你好，世界"),
    ("euc-kr", "안녕하세요"),
    ("big5", "你好，世界"),
    ("iso-8859-2", "Zażółć gęślą jaźń"),
    ("utf-8", "Grüße, 你好, 🙂"),
]


@pytest.mark.parametrize(("charset", "text"), CHARSET_SAMPLES)
def test_charsets_in_body_and_subject(charset: str, text: str) -> None:
    data = text.encode(charset)
    raw = crlf(
        "From: x@y.example\n"
        f"Subject: {ew(text, charset)}\n"
        f'Content-Type: text/plain; charset="{charset}"\n'
        "Content-Transfer-Encoding: base64\n\n"
        f"{b64(data)}\n"
    )
    mail = parse(raw)
    assert mail.subject == text
    assert mail.text == text


def test_gb2312_label_on_gbk_text_decodes_as_gb18030() -> None:
    text = "你好，镕基"
    raw = crlf(
        "From: x@y.example\nSubject: hi\nContent-Type: text/plain; charset=gb2312\n"
        f"Content-Transfer-Encoding: base64\n\n{b64(text.encode('gbk'))}\n"
    )
    assert parse(raw).text == text


def test_cp932_characters_under_a_shift_jis_label() -> None:
    text = "①番 ～ 髙橋"
    assert decode_bytes(text.encode("cp932"), "shift_jis") == text


def test_invalid_bytes_and_unknown_charsets_never_raise() -> None:
    assert decode_bytes(b"ok \xff\xfe end", "utf-8") == "ok \ufffd\ufffd end"
    assert decode_bytes("Grüße".encode("cp1252"), "x-klingon") == "Grüße"
    assert decode_bytes("Grüße".encode(), None) == "Grüße"
    assert decode_bytes("Grüße".encode("cp1252"), None) == "Grüße"
    assert decode_bytes(b"\x1b$B%F%9%H\x1b(B", "iso-2022-jp") == "テスト"
    assert decode_bytes(b"\x1b$B\xff\xff", "iso-2022-jp")  # broken, but text
    raw = crlf("From: x@y.example\nContent-Type: text/plain; charset=utf-8\n\n") + b"a\xffb\r\n"
    assert parse(raw).text == "a\ufffdb"


def test_rfc2047_word_split_inside_a_multibyte_character() -> None:
    data = "Привет мир — тест".encode()
    cut = 7  # the middle of the fourth Cyrillic letter
    assert data[:cut].decode("utf-8", errors="replace").endswith("\ufffd")
    first = base64.b64encode(data[:cut]).decode()
    second = base64.b64encode(data[cut:]).decode()
    header = f"Re: =?UTF-8?B?{first}?=\r\n =?utf-8?B?{second}?= [x]"
    assert decode_header_value(header) == "Re: Привет мир — тест [x]"
    q1 = "".join(f"={b:02X}" for b in data[:cut])
    q2 = "".join(f"={b:02X}" for b in data[cut:])
    assert decode_header_value(f"=?utf-8?Q?{q1}?= =?utf-8?Q?{q2}?=") == "Привет мир — тест"
    raw = crlf(f"From: x@y.example\nSubject: =?UTF-8?B?{first}?=\n =?UTF-8?B?{second}?=\n\nhi\n")
    assert parse(raw).subject == "Привет мир — тест"


def test_header_oddities() -> None:
    assert decode_header_value("=?utf-8?q?a_b?= c") == "a b c"
    assert decode_header_value("=?utf-8?q?a?= =?iso-8859-1?q?=FC?=") == "aü"
    assert decode_header_value("=?x-unknown?B?SGk=?=") == "Hi"
    assert decode_header_value("=?utf-8?B?SGk?=") == "Hi"  # padding missing
    assert decode_header_value("=?utf-8?B?###?=") == ""
    assert decode_header_value("plain =?broken") == "plain =?broken"
    raw = "Subject: Grüße aus Köln\r\nFrom: Jörg <j@x.example>\r\n\r\nhi\r\n".encode()
    mail = parse(raw)
    assert mail.subject == "Grüße aus Köln" and mail.from_name == "Jörg"


def test_addresses_survive_hostile_headers() -> None:
    raw = crlf(
        "From: " + "(" * 5000 + "evil@x.example\n"
        "To: " + ", ".join(f"u{i}@x.example" for i in range(2000)) + "\n"
        "Subject: x\n\nhi\n"
    )
    started = time.process_time()
    mail = parse(raw)
    assert time.process_time() - started < 2
    assert len(mail.to) == 2000


def test_missing_and_broken_headers() -> None:
    mail = parse(b"\r\njust a body\r\n")
    assert mail.subject == "" and mail.from_address == "" and mail.message_id is None
    assert mail.date is None and mail.text == "just a body"
    mail = parse(crlf("Date: someday\nMessage-ID: bare-id@host\nFrom: nobody\n\nx\n"))
    assert mail.date is None and mail.message_id == "<bare-id@host>"
    assert mail.from_address == ""
    mail = parse(crlf("Date: Tue, 4 Mar 2025 09:30:00 -0000\n\nx\n"))
    assert mail.date == datetime(2025, 3, 4, 9, 30, tzinfo=UTC)


# --- attachments --------------------------------------------------------------------------------


def with_parts(*parts: str, top: str = "") -> bytes:
    body = "".join(f"--BOUNDARY\n{p}\n" for p in parts)
    return crlf(
        f"From: x@y.example\nSubject: files\n{top}"
        'Content-Type: multipart/mixed; boundary="BOUNDARY"\n\n'
        f"{body}--BOUNDARY--\n"
    )


def test_attachments_with_non_ascii_names() -> None:
    pdf = b"%PDF-1.4 fake"
    raw = with_parts(
        "Content-Type: text/plain; charset=utf-8\n\nSee attached.",
        "Content-Type: application/pdf\n"
        "Content-Disposition: attachment;"
        " filename*=UTF-8''%D0%A1%D1%87%D1%91%D1%82%20%E2%84%965.pdf\n"
        f"Content-Transfer-Encoding: base64\n\n{b64(pdf)}",
        "Content-Type: application/vnd.ms-excel\n"
        "Content-Disposition: attachment;\n"
        " filename*0*=iso-8859-1''Gr%FC%DFe%20aus%20;\n"
        " filename*1*=M%FCnchen.xls\n"
        f"Content-Transfer-Encoding: base64\n\n{b64(b'xls')}",
        'Content-Type: image/png; name="=?UTF-8?B?5paH5Lu2LnBuZw==?="\n'
        'Content-Disposition: attachment; filename="=?UTF-8?B?5paH5Lu2LnBuZw==?="\n'
        f"Content-Transfer-Encoding: base64\n\n{b64(b'png')}",
        'Content-Type: text/csv\nContent-Disposition: attachment; filename="../../etc/passwd"\n\n'
        "a,b",
    )
    mail = parse(raw)
    assert mail.text == "See attached."
    names = [a.filename for a in mail.attachments]
    assert names == ["Счёт №5.pdf", "Grüße aus München.xls", "文件.png", "passwd"]
    first = mail.attachments[0]
    assert first.data == pdf and first.size == len(pdf) and first.content_type == "application/pdf"


def test_raw_8bit_filename() -> None:
    raw = with_parts(
        "Content-Type: text/plain\n\nhi",
        "Content-Type: application/pdf\nContent-Disposition: attachment; "
        'filename="SCHET.pdf"\n\nabc',
    ).replace(b"SCHET", "Счёт".encode())
    assert parse(raw).attachments[0].filename == "Счёт.pdf"


def test_inline_image_and_attached_message() -> None:
    inner = "From: a@b.example\nSubject: forwarded\nMessage-ID: <inner@b.example>\n\ninner body"
    raw = with_parts(
        'Content-Type: text/html; charset=utf-8\n\n<p>Look <img src="cid:img1@x"></p>',
        "Content-Type: image/png\nContent-ID: <img1@x>\nContent-Disposition: inline\n"
        f"Content-Transfer-Encoding: base64\n\n{b64(b'png')}",
        f"Content-Type: message/rfc822\n\n{inner}",
    )
    mail = parse(raw)
    assert mail.text == "Look"  # the attached message's text is not the reply's
    image, message = mail.attachments
    assert image.inline and image.content_id == "img1@x" and image.data == b"png"
    assert message.content_type == "message/rfc822" and message.filename == "message.eml"
    assert b"Subject: forwarded" in message.data and b"inner body" in message.data


# --- MIME bombs ---------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    head = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(depth)
    )
    tail = "".join(f"--b{i}--\n" for i in reversed(range(depth)))
    return crlf(f"From: a@b.example\nSubject: x\n{head}Content-Type: text/plain\n\nhi\n{tail}")


def quickly_refused(raw: bytes, limits: Limits | None = None, seconds: float = 1.0) -> str:
    started = time.process_time()
    with pytest.raises(MailTooComplex) as refused:
        parse(raw, limits)
    assert time.process_time() - started < seconds
    return refused.value.reason


def test_nesting_within_the_limit_is_fine() -> None:
    assert parse(nested(9)).text == "hi"


def test_deep_nesting_is_refused_quickly() -> None:
    assert "nested" in quickly_refused(nested(11))
    assert "nested" in quickly_refused(nested(1000))
    rfc822 = crlf("From: a@b.example\n" + "Content-Type: message/rfc822\n\n" * 1000 + "hi\n")
    quickly_refused(rfc822)


def test_thousands_of_parts_are_refused_quickly() -> None:
    part = "--B\nContent-Type: text/plain\n\nx\n"
    raw = crlf(
        'From: a@b.example\nContent-Type: multipart/mixed; boundary="B"\n\n'
        + part * 10_000
        + "--B--\n"
    )
    assert "parts" in quickly_refused(raw)


def test_too_many_attachments() -> None:
    parts = ["Content-Type: text/plain\n\nhi"] + [
        f'Content-Type: application/pdf\nContent-Disposition: attachment; filename="{i}.pdf"\n\nx'
        for i in range(51)
    ]
    assert "attachments" in quickly_refused(with_parts(*parts))
    assert len(parse(with_parts(*parts[:51])).attachments) == 50


def test_attachment_over_the_limit_is_refused_before_decoding() -> None:
    limits = Limits(max_attachment_bytes=1 << 20)
    big = b64(b"\0" * ((1 << 20) + 1))
    raw = with_parts(
        "Content-Type: text/plain\n\nhi",
        f"Content-Type: application/zip\nContent-Disposition: attachment; filename=a.zip\n"
        f"Content-Transfer-Encoding: base64\n\n{big}",
    )
    assert "larger" in quickly_refused(raw, limits)
    exactly = b64(b"\0" * (1 << 20))
    raw = with_parts(
        f"Content-Type: application/zip\nContent-Disposition: attachment; filename=a.zip\n"
        f"Content-Transfer-Encoding: base64\n\n{exactly}"
    )
    assert parse(raw, limits).attachments[0].size == 1 << 20


def test_default_attachment_limit() -> None:
    big = b64(b"\0" * ((10 << 20) + 10))
    raw = with_parts(
        f"Content-Type: application/zip\nContent-Disposition: attachment; filename=a.zip\n"
        f"Content-Transfer-Encoding: base64\n\n{big}"
    )
    quickly_refused(raw, seconds=3)


def test_declared_size_and_total_size() -> None:
    limits = Limits(max_attachment_bytes=1000, max_total_decoded_bytes=2500)
    declared = with_parts(
        "Content-Type: application/zip\n"
        "Content-Disposition: attachment; filename=a.zip; size=99999999\n\nPK"
    )
    assert "declared" in quickly_refused(declared, limits)
    three = with_parts(
        *[
            f"Content-Type: application/pdf\nContent-Disposition: attachment; filename={i}.pdf\n\n"
            + "x" * 900
            for i in range(3)
        ]
    )
    assert "content" in quickly_refused(three, limits)
    assert len(parse(three, Limits(max_attachment_bytes=1000)).attachments) == 3


def test_message_size_limit() -> None:
    assert "larger" in quickly_refused(b"x" * 2000, Limits(max_message_bytes=1000))


def test_hostile_content_type_fields_are_refused_or_read_quickly() -> None:
    semicolons = crlf(
        'From: a@b.example\nContent-Type: multipart/mixed; a="' + ";" * 100_000 + '"; boundary=x\n'
        "\n--x\nContent-Type: text/plain\n\nhi\n--x--\n"
    )
    quickly_refused(semicolons)
    params = "; ".join(f'p{i}="v"' for i in range(10_000))
    quickly_refused(crlf(f"From: a@b.example\nContent-Type: text/plain; {params}\n\nhi\n"))
    comments = crlf(
        "From: a@b.example\nContent-Type: multipart/mixed; "
        + "(" * 3000
        + ' boundary="x"\n\n--x\nContent-Type: text/plain\n\nhi\n--x--\n'
    )
    started = time.process_time()
    parse(comments)
    assert time.process_time() - started < 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_never_raises_anything_but_too_complex(raw: bytes) -> None:
    try:
        mail = parse(raw)
    except MailTooComplex:
        return
    assert isinstance(mail, ParsedMail)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "Content-Type: multipart/mixed; boundary=b\n",
                "Content-Type: message/rfc822\n",
                "Content-Type: text/html; charset=gb2312\n",
                "Content-Transfer-Encoding: base64\n",
                "Content-Transfer-Encoding: quoted-printable\n",
                "Content-Disposition: attachment; filename*=utf-8''%FF\n",
                "Subject: =?utf-8?B?8J+Z?= =?bogus?Q?=ZZ?=\n",
                "--b\n",
                "--b--\n",
                "\n",
                "<p>x<blockquote>y",
                "=C3=\n",
                "QUJD\n",
                "\xff\xfe\n",
            ]
        ),
        max_size=40,
    )
)
def test_never_raises_on_mime_shaped_garbage(lines: list[str]) -> None:
    raw = "".join(lines).encode("utf-8", errors="surrogateescape")
    with contextlib.suppress(MailTooComplex):
        parse(raw)


# --- HTML ---------------------------------------------------------------------------------------


def test_html_is_sanitised() -> None:
    html, cut = sanitise_html(
        '<p onclick="steal()">Hi<script>alert(1)</script><style>body{}</style>'
        '<img src="https://cdn.example/a.png" onerror="steal()">'
        '<img src="data:image/png;base64,AAAA"><img src="cid:x"><img src="/relative.png">'
        '<a href="javascript:alert(1)">bad</a><a href="https://example.com/x">good</a>'
        '<a href="mailto:a@b.example">mail</a><iframe src="https://evil"></iframe>'
        '<form action="https://evil"><input name=x></form>'
        '<span style="color: red; position: fixed; background-image: url(https://t)">s</span>'
        "<!-- a comment --></p>"
    )
    assert not cut
    for gone in ("script", "alert", "onclick", "onerror", "steal", "<style", "body{}", "data:"):
        assert gone not in html
    for gone in ("cid:", "relative", "javascript", "iframe", "<form", "<input", "position"):
        assert gone not in html
    assert "background-image" not in html and "comment" not in html
    assert '<img src="https://cdn.example/a.png">' in html
    assert 'href="https://example.com/x"' in html and 'href="mailto:a@b.example"' in html
    assert 'rel="noopener noreferrer nofollow"' in html
    assert 'style="color:red"' in html.replace(" ", "")


def test_deeply_nested_html_is_cut_not_slow() -> None:
    raw = crlf("From: a@b.example\nContent-Type: text/html\n\n") + b"<div>" * 100_000 + b"x"
    started = time.process_time()
    mail = parse(raw)
    assert time.process_time() - started < 5
    assert mail.truncated and mail.html_sanitised is not None


@pytest.mark.parametrize(
    "body",
    [
        b"&" * 900_000,  # character references in one text run
        "\xa0".encode() * 400_000,
        b'<a title="' + b"&" * 500_000 + b'">x</a>',
        ("<p " + " ".join(f"a{i}=1" for i in range(200_000)) + ">x").encode(),  # attributes
        b"<b></p>" * 100_000,  # end tags html5ever must repair
        b"<ul><li>" * 50_000,
    ],
)
def test_hostile_html_takes_bounded_time(body: bytes) -> None:
    raw = crlf("From: a@b.example\nContent-Type: text/html; charset=utf-8\n\n") + body
    started = time.process_time()
    parse(raw)
    assert time.process_time() - started < 3


def test_siblings_the_parser_closes_do_not_count_as_depth() -> None:
    # Sloppy but real HTML: unclosed paragraphs, list items and cells are siblings, so a long
    # newsletter of them is not cut by the depth limit.
    html = (
        "<html><body>"
        + "<p>para" * 1500
        + "<ul>"
        + "<li>item" * 1500
        + "</ul>"
        + "<table>"
        + "<tr><td>a<td>b" * 1500
        + "</table>"
        + "<div><span>" * 200
        + "deep"
        + "</span></div>" * 200
        + "<br><img src='https://cdn.example/x.png'>" * 1500
        + "<p>the end</p></body></html>"
    )
    sanitised, cut = sanitise_html(html)
    assert not cut
    assert "the end" in sanitised and "deep" in sanitised


def test_nesting_beyond_the_depth_limit_is_cut_there() -> None:
    sanitised, cut = sanitise_html("<div>" * 50 + "kept" + "<ul><li>" * 30 + "lost", max_depth=100)
    assert cut
    assert "kept" in sanitised and "lost" not in sanitised
    assert sanitised.count("<li>") == 25  # 50 divs and 25 lists fill 100; the 26th list cut


def test_long_runs_of_ampersands_keep_their_text() -> None:
    from server.mailbridge.parsing import html_to_text

    html, cut = sanitise_html("<p>a" + "&amp;" * 2500 + "\xa0" * 1500 + "b</p>")
    assert not cut
    assert html_to_text(html) == "a" + "&" * 2500 + " b"


def test_long_text_is_cut() -> None:
    raw = crlf("From: a@b.example\nContent-Type: text/plain\n\n") + b"word " * 300_000
    mail = parse(raw, Limits(max_text_chars=10_000))
    assert mail.truncated and len(mail.text) == 10_000


# --- noise --------------------------------------------------------------------------------------


def simple(headers: str, subject: str = "Re: Offer", sender: str = "anna@client.example") -> bytes:
    return crlf(f"From: {sender}\nSubject: {subject}\n{headers}\nHello\n")


def test_normal_mail_is_normal() -> None:
    assert classify(parse(gmail_reply())) is Noise.NORMAL
    assert classify(parse(outlook_reply())) is Noise.NORMAL
    assert classify(parse(simple("Auto-Submitted: no\n"))) is Noise.NORMAL
    assert classify(parse(simple("X-Autoreply: no\n"))) is Noise.NORMAL


@pytest.mark.parametrize(
    "header",
    [
        "Auto-Submitted: auto-replied\n",
        "Auto-Submitted: auto-generated\n",
        "auto-submitted: Auto-Replied; owner-email=x@y\n",
        "X-Autoreply: yes\n",
        "X-Autorespond: Out of office\n",
        "Precedence: bulk\n",
        "Precedence: junk\n",
        "Precedence: list\n",
    ],
)
def test_auto_reply_headers(header: str) -> None:
    assert classify(parse(simple(header))) is Noise.AUTO_REPLY


def test_auto_reply_subjects_need_a_header_hint() -> None:
    for subject in ("Out of Office: Offer", "Automatic reply: Offer", "Abwesenheitsnotiz: Offer"):
        assert classify(parse(simple("", subject=subject))) is Noise.NORMAL
        hinted = simple("X-Auto-Response-Suppress: All\n", subject=subject)
        assert classify(parse(hinted)) is Noise.AUTO_REPLY
        assert classify(parse(simple("Return-Path: <>\n", subject=subject))) is Noise.AUTO_REPLY


def test_our_own_mail_coming_back() -> None:
    mail = parse(simple("X-PortalHub-Origin: node-1\nAuto-Submitted: auto-replied\n"))
    assert classify(mail) is Noise.OUR_OWN
    assert mail.portalhub == {"x-portalhub-origin": "node-1"}


ORIGINAL_ID = "<65f1c0ffee0123456789abcd.1a2b3c4d@portal.example>"


def dsn(report_type: str = "delivery-status") -> bytes:
    return crlf(
        "Return-Path: <>\n"
        "Received: from mx.portal.example by mx.portal.example (Postfix)\n"
        "Date: Tue, 4 Mar 2025 09:30:00 +0000 (UTC)\n"
        "From: MAILER-DAEMON@mx.portal.example (Mail Delivery System)\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "To: crm@portal.example\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        f"Content-Type: multipart/report; report-type={report_type};\n"
        '\tboundary="4F2A1C0ABC.1741080600/mx.portal.example"\n'
        "Message-Id: <20250304093000.4F2A1C0ABC@mx.portal.example>\n"
        "\n"
        "This is a MIME-encapsulated message.\n"
        "\n"
        "--4F2A1C0ABC.1741080600/mx.portal.example\n"
        "Content-Description: Notification\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
        "This is the mail system at host mx.portal.example.\n"
        "\n"
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients.\n"
        "\n"
        "<nobody@client.example>: host mx.client.example[192.0.2.1] said: 550 5.1.1\n"
        "    <nobody@client.example>: Recipient address rejected: User unknown\n"
        "\n"
        "--4F2A1C0ABC.1741080600/mx.portal.example\n"
        "Content-Description: Delivery report\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        "Reporting-MTA: dns; mx.portal.example\n"
        "X-Postfix-Queue-ID: 4F2A1C0ABC\n"
        "Arrival-Date: Tue,  4 Mar 2025 09:29:58 +0000 (UTC)\n"
        "\n"
        "Final-Recipient: rfc822; nobody@client.example\n"
        "Original-Recipient: rfc822;nobody@client.example\n"
        "Action: failed\n"
        "Status: 5.1.1\n"
        "Remote-MTA: dns; mx.client.example\n"
        "Diagnostic-Code: smtp; 550 5.1.1 <nobody@client.example>: Recipient address\n"
        "    rejected: User unknown\n"
        "\n"
        "Final-Recipient: rfc822; slow@client.example\n"
        "Action: delayed\n"
        "Status: 4.4.1\n"
        "\n"
        "--4F2A1C0ABC.1741080600/mx.portal.example\n"
        "Content-Description: Undelivered Message Headers\n"
        "Content-Type: text/rfc822-headers\n"
        "\n"
        "From: Bob Smith <crm@portal.example>\n"
        "To: nobody@client.example\n"
        f"Subject: Offer {in_text(CODE)}\n"
        f"Message-ID: {ORIGINAL_ID}\n"
        "X-PortalHub-Origin: node-1\n"
        "\n"
        "--4F2A1C0ABC.1741080600/mx.portal.example--\n"
    )


def test_dsn_is_a_bounce_with_the_original_message_id() -> None:
    mail = parse(dsn())
    assert classify(mail) is Noise.BOUNCE and is_bounce(mail)
    info = bounce_info(dsn())
    assert info == BounceInfo(
        original_message_id=ORIGINAL_ID,
        recipients=("nobody@client.example",),
        delayed=("slow@client.example",),
        status="5.1.1",
        diagnostic="smtp; 550 5.1.1 <nobody@client.example>: Recipient address rejected: "
        "User unknown",
    )
    assert mail.text.startswith("This is the mail system")


def test_dsn_with_the_whole_original_attached() -> None:
    raw = dsn().replace(b"text/rfc822-headers", b"message/rfc822")
    origin = b"X-PortalHub-Origin: node-1\r\n\r\n"
    raw = raw.replace(origin, origin + b"Hi\r\n")
    info = bounce_info(raw)
    assert info is not None and info.original_message_id == ORIGINAL_ID
    assert classify(parse(raw)) is Noise.BOUNCE  # our header inside does not make it ours


def test_mailer_daemon_without_a_report() -> None:
    raw = crlf(
        "From: MAILER-DAEMON@mx.client.example\n"
        "Subject: failure notice\n"
        "\n"
        "Hi. This is the qmail-send program at mx.client.example.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n"
        "\n"
        "<gone@client.example>:\n"
        "Sorry, no mailbox here by that name. (#5.1.1)\n"
        "\n"
        "--- Below this line is a copy of the message.\n"
        "\n"
        "From: crm@portal.example\n"
        f"Message-ID: {ORIGINAL_ID}\n"
        "Subject: Offer\n"
    )
    mail = parse(raw)
    assert classify(mail) is Noise.BOUNCE
    info = bounce_info(raw)
    assert info is not None
    assert info.original_message_id == ORIGINAL_ID
    assert info.recipients == ("gone@client.example",)


PLAIN_BOUNCES = {
    "own words, then a quoted copy": (
        "Hello, this is the mail system at mx.example.test.\n\n"
        "I could not deliver your message to gone@client.example: the mailbox is full.\n\n"
        "--- Original message follows ---\n"
        "> Message-ID: {id}\n> To: gone@client.example, stays@client.example\n"
    ),
    "exchange": (
        "Delivery has failed to these recipients or groups:\n\n"
        "GONE@client.example\nThe e-mail address you entered couldn't be found.\n\n"
        "Original message headers:\n\n"
        "Message-ID: {id}\nTo: gone@client.example, stays@client.example\n"
    ),
}


@pytest.mark.parametrize("style", sorted(PLAIN_BOUNCES))
def test_a_plain_text_bounce_names_the_failed_one_of_the_mails_recipients(style: str) -> None:
    raw = crlf(
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.test>\n"
        "To: crm@portal.example\nSubject: Undelivered Mail Returned to Sender\n\n"
        + PLAIN_BOUNCES[style].format(id=ORIGINAL_ID)
    )
    info = bounce_info(raw)
    assert info is not None and info.original_message_id == ORIGINAL_ID
    assert info.recipients == ()  # no detector reads these: the text has to
    text = parse(raw).text
    assert failed_in_text(text, ["gone@client.example", "stays@client.example"]) == (
        "gone@client.example",
    )


def test_failed_in_text_reads_only_the_bounces_own_words() -> None:
    copy = "--- Below this line is a copy of the message.\n\nTo: a@x.example, b@x.example\n"
    assert failed_in_text(f"Could not deliver.\n\n{copy}", ["a@x.example", "b@x.example"]) == ()
    # one recipient: the bounce is about it, named or not
    assert failed_in_text(f"Could not deliver.\n\n{copy}", ["A@x.example"]) == ("a@x.example",)
    # a longer address holding a recipient's is not it
    assert failed_in_text("no such user: ba@x.example\n", ["a@x.example", "c@x.example"]) == ()
    assert failed_in_text("anything", []) == ()


def test_codes_of_attached_messages_are_read_as_well() -> None:
    inner = simple(f"Reply with {in_text(CODE)} quoted", subject="Re: offer")
    as_message = crlf(
        "From: fwd@client.example\nSubject: Fwd\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="B"\n\n--B\nContent-Type: text/plain\n\n'
        "See below\n--B\nContent-Type: message/rfc822\n\n"
    )
    as_message += inner + b"\r\n--B--\r\n"
    as_file = crlf(
        "From: fwd@client.example\nSubject: Fwd\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="B"\n\n--B\nContent-Type: text/plain\n\n'
        "See attached\n--B\nContent-Type: application/octet-stream\n"
        'Content-Disposition: attachment; filename="reply.EML"\n'
        "Content-Transfer-Encoding: base64\n\n"
    )
    as_file += base64.encodebytes(inner).replace(b"\n", b"\r\n") + b"--B--\r\n"
    for raw in (as_message, as_file):
        mail = parse(raw)
        assert find_codes(mail.text) == []  # not the mail's own text
        assert [c for t in mail.attached_texts for c in find_codes(t)] == [CODE]
        assert len(mail.attachments) == 1
    # a broken .eml is no error, and no code
    broken = as_file.replace(base64.encodebytes(inner).replace(b"\n", b"\r\n"), b"AAAA\r\n")
    assert not [c for t in parse(broken).attached_texts for c in find_codes(t)]


def test_postmaster_mail_that_is_not_a_bounce() -> None:
    raw = simple("", subject="Hello from the postmaster", sender="postmaster@client.example")
    assert classify(parse(raw)) is Noise.NORMAL
    assert bounce_info(raw) is None


def test_read_receipt_is_automatic_not_a_bounce() -> None:
    raw = dsn("disposition-notification").replace(b"MAILER-DAEMON", b"anna")
    raw = raw.replace(b"message/delivery-status", b"message/disposition-notification")
    raw = raw.replace(b"Return-Path: <>", b"Return-Path: <anna@client.example>")
    assert classify(parse(raw)) is Noise.AUTO_REPLY
