"""The mail bridge end to end, over real protocols: the CRM sends through a relay (an aiosmtpd
sink); replies are built from the captured mail the way Outlook, Gmail, Apple Mail and others
write them, and come back over SMTP to the hub's listener or by APPEND into a real Dovecot
mailbox. Each must land on the record it answers, with the new text as its description and the
history kept, and light the responsible user's counter live. Hostile and odd mail (30 MB, MIME
bombs, a zip bomb, legacy charsets, encoded words split inside a character) goes the same way.
"""

# The replies are mail in many scripts: their Cyrillic letters and full-width signs are meant.
# The fixtures shared with test_mail_bridge and test_mail_imap are imported, and a test's
# parameter of the same name is how pytest hands them over: not a redefinition.
# ruff: noqa: RUF001, F811

from __future__ import annotations

import base64
import email.base64mime
import email.quoprimime
import io
import logging
import os
import quopri
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

import aiosmtplib
import pytest

from server.mailbridge.codes import body_line, in_text
from tests.harness import HubHarness, SocketClient
from tests.test_mail_bridge import (
    Sink,
    mailhub,  # noqa: F401 - fixture: a hub (default limits) sending through the sink
    send_from_deal,
    settled,
    sink,  # noqa: F401 - fixture: the relay, an aiosmtpd sink
)
from tests.test_mail_imap import (
    Dovecot,
    add_mailbox,
    append,
    count,
    dovecot,  # noqa: F401 - fixture: a real Dovecot
    wait_for,
)

INBOX = "crm@portal.test"
CLIENT = "client@example.test"
MAX_BYTES = 25 * 1024 * 1024  # PORTALHUB_MAIL_MAX_MESSAGE_BYTES' default, which these tests use


# --- raw MIME, written as mail programs write it ------------------------------------------------


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("ascii")


def encode_body(text: str, charset: str, cte: str) -> bytes:
    """``text`` in ``charset`` under a transfer encoding, with CRLF line ends."""
    lines = text.split("\n")
    if charset.lower() == "iso-2022-jp":  # each line back to ASCII before its end
        data = b"\n".join(line.encode("iso2022_jp") for line in lines)
    else:
        data = text.encode(charset)
    if cte == "quoted-printable":
        return quopri.encodestring(data).replace(b"\n", b"\r\n")
    if cte == "base64":
        return base64.encodebytes(data.replace(b"\n", b"\r\n")).replace(b"\n", b"\r\n")
    return data.replace(b"\n", b"\r\n")  # 7bit, 8bit


def leaf(subtype: str, text: str, charset: str, cte: str = "quoted-printable") -> bytes:
    head = f'Content-Type: text/{subtype}; charset="{charset}"\r\n'
    head += f"Content-Transfer-Encoding: {cte}\r\n\r\n"
    return head.encode("ascii") + encode_body(text, charset, cte)


def multipart(subtype: str, boundary: str, *parts: bytes) -> bytes:
    out = f'Content-Type: multipart/{subtype};\r\n\tboundary="{boundary}"\r\n\r\n'.encode()
    for part in parts:
        out += f"--{boundary}\r\n".encode() + part.rstrip(b"\r\n") + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def message(headers: list[tuple[str, str]], content: bytes) -> bytes:
    """A whole message: ``headers`` as given (already encoded), then the content entity."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("ascii") + b"MIME-Version: 1.0\r\n" + content


def split_words(text: str, encoding: str = "B", charset: str = "utf-8") -> str:
    """``text`` as two RFC 2047 encoded words split inside one multibyte character, folded
    between them - as mail programs that cut a long subject by bytes write it."""
    data = text.encode(charset)
    inside = [i for i, byte in enumerate(data) if 0x80 <= byte <= 0xBF]
    cut = min(inside, key=lambda i: abs(i - len(data) // 2))
    with pytest.raises(UnicodeDecodeError):
        data[:cut].decode(charset)  # the cut really is inside a character
    encode = email.base64mime.header_encode if encoding == "B" else email.quoprimime.header_encode
    return f"{encode(data[:cut], charset)}\r\n {encode(data[cut:], charset)}"


def iso2022jp_words(text: str) -> str:
    """``text`` as ISO-2022-JP B encoded words, as Japanese mail programs write subjects."""
    data = "\n".join(text.split("\n")).encode("iso2022_jp")
    return email.base64mime.header_encode(data, "iso-2022-jp")


def new_id(host: str) -> str:
    return f"<{uuid.uuid4().hex.upper()}@{host}>"


# --- the mail the CRM sent, and replies to it ------------------------------------------------


@dataclass(frozen=True)
class Original:
    """What the relay received for one mail sent from a deal."""

    subject: str
    text: str
    sender_name: str
    sender: str  # the From address: the CRM inbox
    reply_to: str  # the plus-address carrying the code
    message_id: str
    code: str

    @classmethod
    def of(cls, sent: EmailMessage) -> Original:
        name, address = parseaddr(str(sent["From"]))
        reply_to = parseaddr(str(sent["Reply-To"]))[1]
        body = sent.get_body(("plain",))
        assert body is not None
        return cls(
            subject=str(sent["Subject"]),
            text=str(body.get_content()).replace("\r\n", "\n").strip(),
            sender_name=name,
            sender=address,
            reply_to=reply_to,
            message_id=str(sent["Message-ID"]),
            code=reply_to.split("@")[0].split("+", 1)[1],
        )

    @property
    def code_in_body(self) -> bool:
        return in_text(self.code) in self.text


@dataclass(frozen=True)
class Reply:
    style: str
    raw: bytes
    to: str  # where it is addressed (the SMTP envelope recipient too)
    subject: str  # as the recipient's program shows it
    new_text: str  # what the person wrote
    quoted: tuple[str, ...]  # pieces of the history the activity must keep
    html: bool


def quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.split("\n"))


def html_lines(text: str) -> str:
    return "<br>\n".join(text.replace("&", "&amp;").replace("<", "&lt;").split("\n"))


def outlook_en(o: Original) -> Reply:
    """New Outlook / Outlook on the web: 'RE: ', a line of underscores and the header block in
    text, <div id="divRplyFwdMsg"> in HTML, Thread-Index but no In-Reply-To or References."""
    new = "Yes, go ahead with the order.\n\nRegards,\nCarl"
    subject = f"RE: {o.subject}"
    block = (
        f"From: {o.sender_name} <{o.sender}>\nSent: Monday, November 23, 2026 10:00 AM\n"
        f"To: Carl Client <{CLIENT}>\nSubject: {o.subject}"
    )
    text = f"{new}\n\n________________________________\n{block}\n\n{o.text}\n"
    html = (
        '<html><head>\n<meta http-equiv="Content-Type" content="text/html; charset=us-ascii">\n'
        '<style type="text/css" style="display:none;"> P {margin-top:0;margin-bottom:0;} '
        '</style>\n</head>\n<body dir="ltr">\n'
        '<div class="elementToProof" style="font-family: Aptos, Calibri, Helvetica, '
        'sans-serif; font-size: 12pt; color: rgb(0, 0, 0);">\n'
        "Yes, go ahead with the order.</div>\n"
        '<div class="elementToProof"><br></div>\n'
        '<div class="elementToProof">Regards,<br>Carl</div>\n'
        '<div id="appendonsend"></div>\n'
        '<hr style="display:inline-block;width:98%" tabindex="-1">\n'
        '<div id="divRplyFwdMsg" dir="ltr"><font face="Calibri, sans-serif" '
        'style="font-size:11pt" color="#000000"><b>From:</b> '
        f"{o.sender_name} &lt;{o.sender}&gt;<br>\n"
        "<b>Sent:</b> Monday, November 23, 2026 10:00 AM<br>\n"
        f"<b>To:</b> Carl Client &lt;{CLIENT}&gt;<br>\n"
        f"<b>Subject:</b> {o.subject}</font>\n<div>&nbsp;</div>\n</div>\n"
        f"<div>\n<div>{html_lines(o.text)}</div>\n</div>\n</body>\n</html>\n"
    )
    boundary = "_000_AM9PR01MB1234567890ABCDEFAM9PR01MB1234eurp_"
    raw = message(
        [
            ("From", f"Carl Client <{CLIENT}>"),
            ("To", f"{o.sender_name} <{o.reply_to}>"),
            ("Subject", subject),
            ("Thread-Topic", o.subject),
            ("Thread-Index", "AQHbPVKxQ2W1yFZ9SUuO3BHzn6Zc4w=="),
            ("Date", "Mon, 23 Nov 2026 10:14:02 +0000"),
            ("Message-ID", new_id("AM9PR01MB1234.eurprd01.prod.exchangelabs.com")),
            ("Accept-Language", "en-US"),
            ("Content-Language", "en-US"),
            ("X-MS-Has-Attach", ""),
        ],
        multipart(
            "alternative",
            boundary,
            leaf("plain", text, "us-ascii"),
            leaf("html", html, "us-ascii"),
        ),
    )
    quoted = ("Sent: Monday, November 23, 2026 10:00 AM", o.text)
    return Reply("outlook", raw, o.reply_to, subject, new, quoted, html=True)


def outlook_de(o: Original) -> Reply:
    """Outlook for Windows in German: 'AW: ', windows-1252, the Von:/Gesendet:/An:/Betreff:
    block, Word's HTML with the border-top rule; this one keeps In-Reply-To and References."""
    new = "Passt, bitte liefern – Preis 1.200 €.\n\nMit freundlichen Grüßen\nCarl Client"
    subject = f"AW: {o.subject}"
    text = (
        f"{new}\n\nVon: {o.sender_name} <{o.sender}> \n"
        "Gesendet: Montag, 23. November 2026 10:00\n"
        f"An: Carl Client <{CLIENT}>\nBetreff: {o.subject}\n\n{o.text}\n"
    )
    html = (
        '<html xmlns:v="urn:schemas-microsoft-com:vml" '
        'xmlns:o="urn:schemas-microsoft-com:office:office" '
        'xmlns:w="urn:schemas-microsoft-com:office:word" '
        'xmlns="http://www.w3.org/TR/REC-html40"><head>\n'
        '<meta http-equiv=Content-Type content="text/html; charset=windows-1252">\n'
        '<meta name=Generator content="Microsoft Word 15 (filtered medium)">\n'
        "<style><!--\np.MsoNormal {margin:0cm; font-size:11.0pt; "
        'font-family:"Calibri",sans-serif;}\n--></style></head>\n'
        '<body lang=DE link="#0563C1" vlink="#954F72" style=\'word-wrap:break-word\'>\n'
        "<div class=WordSection1>\n"
        "<p class=MsoNormal>Passt, bitte liefern – Preis 1.200 €.<o:p></o:p></p>\n"
        "<p class=MsoNormal><o:p>&nbsp;</o:p></p>\n"
        "<p class=MsoNormal>Mit freundlichen Grüßen<o:p></o:p></p>\n"
        "<p class=MsoNormal>Carl Client<o:p></o:p></p>\n"
        "<p class=MsoNormal><o:p>&nbsp;</o:p></p>\n"
        "<div style='border:none;border-top:solid #E1E1E1 1.0pt;padding:3.0pt 0cm 0cm 0cm'>\n"
        f"<p class=MsoNormal><b>Von:</b> {o.sender_name} &lt;{o.sender}&gt; <br>\n"
        "<b>Gesendet:</b> Montag, 23. November 2026 10:00<br>\n"
        f"<b>An:</b> Carl Client &lt;{CLIENT}&gt;<br>\n"
        f"<b>Betreff:</b> {o.subject}<o:p></o:p></p>\n</div>\n"
        "<p class=MsoNormal><o:p>&nbsp;</o:p></p>\n"
        f"<p class=MsoNormal>{html_lines(o.text)}<o:p></o:p></p>\n</div>\n</body>\n</html>\n"
    )
    raw = message(
        [
            ("From", f"Carl Client <{CLIENT}>"),
            ("To", f'"{o.sender_name}" <{o.reply_to}>'),
            ("Subject", subject),
            ("Date", "Mon, 23 Nov 2026 11:02:40 +0100"),
            ("Message-ID", new_id("example.test")),
            ("In-Reply-To", o.message_id),
            ("References", o.message_id),
            ("Thread-Index", "AQJbXk1Ri0VhMFlXWk5aV2g5aB2w9Q=="),
            ("Content-Language", "de"),
            ("X-Mailer", "Microsoft Outlook 16.0"),
        ],
        multipart(
            "alternative",
            "----=_NextPart_000_0017_01DB3D9E.6C1A5B20",
            leaf("plain", text, "windows-1252"),
            leaf("html", html, "windows-1252"),
        ),
    )
    quoted = ("Gesendet: Montag, 23. November 2026 10:00", o.text)
    return Reply("outlook-de", raw, o.reply_to, subject, new, quoted, html=True)


def gmail(o: Original) -> Reply:
    """Gmail: 'Re: ', the 'On …, Mary <…> wrote:' attribution above '>' lines, the
    gmail_quote blockquote in HTML, In-Reply-To and References."""
    new = "Thanks — confirmed, please ship on Friday."
    subject = f"Re: {o.subject}"
    attribution = f"On Mon, 23 Nov 2026 at 10:00, {o.sender_name} <{o.sender}> wrote:"
    text = f"{new}\n\n{attribution}\n\n{quote(o.text)}\n"
    html = (
        f'<div dir="ltr">{new}</div><br><div class="gmail_quote gmail_quote_container">'
        '<div dir="ltr" class="gmail_attr">On Mon, 23 Nov 2026 at 10:00, '
        f'{o.sender_name} &lt;<a href="mailto:{o.sender}">{o.sender}</a>&gt; wrote:<br></div>'
        '<blockquote class="gmail_quote" style="margin:0px 0px 0px 0.8ex;'
        'border-left:1px solid rgb(204,204,204);padding-left:1ex">'
        f'<div dir="ltr">{html_lines(o.text)}</div>\n</blockquote></div>\n'
    )
    raw = message(
        [
            ("References", o.message_id),
            ("In-Reply-To", o.message_id),
            ("From", f"Carl Client <{CLIENT}>"),
            ("Date", "Mon, 23 Nov 2026 10:20:11 +0000"),
            ("Message-ID", f"<CAH{uuid.uuid4().hex}+w@mail.gmail.com>"),
            ("Subject", subject),
            ("To", f"{o.sender_name} <{o.reply_to}>"),
        ],
        multipart(
            "alternative",
            "000000000000a1b2c3062e5f0d7a",
            leaf("plain", text, "UTF-8"),
            leaf("html", html, "UTF-8"),
        ),
    )
    quoted = ("wrote:", quote(o.text).split("\n")[0])
    return Reply("gmail", raw, o.reply_to, subject, new, quoted, html=True)


def apple_mail(o: Original) -> Reply:
    """Apple Mail, HTML only: 'Re: ', the attribution and the quote in
    <blockquote type="cite">, no text/plain part at all."""
    new = "Sounds good. Can we move delivery to Tuesday?\n\nCarl"
    subject = f"Re: {o.subject}"
    html = (
        '<html aria-label="message body"><head><meta http-equiv="content-type" '
        'content="text/html; charset=utf-8"></head>'
        '<body style="overflow-wrap: break-word; -webkit-nbsp-mode: space; '
        'line-break: after-white-space;">'
        "Sounds good. Can we move delivery to Tuesday?<div><br></div><div>Carl<br "
        'id="lineBreakAtBeginningOfMessage"><div><br><blockquote type="cite">'
        f"<div>On 23 Nov 2026, at 10:00, {o.sender_name} &lt;{o.sender}&gt; wrote:</div>"
        '<br class="Apple-interchange-newline"><div><div>'
        f"{html_lines(o.text)}</div></div></blockquote></div><br></div></body></html>"
    )
    raw = crlf(
        f"From: Carl Client <{CLIENT}>\n"
        "Content-Type: text/html;\n\tcharset=utf-8\n"
        "Content-Transfer-Encoding: quoted-printable\n"
        "Mime-Version: 1.0 (Mac OS X Mail 16.0 \\(3826.200.121\\))\n"
        f"Subject: {subject}\n"
        "Date: Mon, 23 Nov 2026 10:31:47 +0000\n"
        f"References: {o.message_id}\n"
        f"To: {o.sender_name} <{o.reply_to}>\n"
        f"In-Reply-To: {o.message_id}\n"
        f"Message-Id: {new_id('example.test')}\n"
        "X-Mailer: Apple Mail (2.3826.200.121)\n\n"
    ) + encode_body(html, "utf-8", "quoted-printable")
    quoted = ("wrote:", quote(o.text).split("\n")[0])  # the blockquote read as '>' lines
    return Reply("apple-mail", raw, o.reply_to, subject, new, quoted, html=True)


def code_moved_text(o: Original) -> Reply:
    """The subject rewritten (no code, no prefix), no thread headers, sent to the plain CRM
    inbox: only the body carries the code - the quoted reference line when the CRM put it in
    the body, else the code the person moved into their own text."""
    new = "We need the delivery by Friday, not Monday."
    if not o.code_in_body:
        new += f"\nOur reference: {in_text(o.code)}"
    subject = "Delivery date for the warehouse order"
    text = f"{new}\n\nOn 23/11/2026 10:00, {o.sender_name} wrote:\n{quote(o.text)}\n"
    raw = message(
        [
            ("Message-ID", new_id("example.test")),
            ("Date", "Mon, 23 Nov 2026 10:40:00 +0000"),
            ("User-Agent", "Mozilla Thunderbird"),
            ("Content-Language", "en-GB"),
            ("To", INBOX),
            ("From", f"Carl Client <{CLIENT}>"),
            ("Subject", subject),
        ],
        leaf("plain", text, "UTF-8", "7bit").replace(
            b'charset="UTF-8"', b"charset=UTF-8; format=flowed"
        ),
    )
    return Reply("code-moved", raw, INBOX, subject, new, ("wrote:", quote(o.text)), False)


def code_moved_html(o: Original) -> Reply:
    """The same in HTML only, from a webmail that pastes rich text: the person's own copy of
    the code is split across elements."""
    new = "Please add two more shelves."
    paragraph = f"<p>{new}</p>"
    if not o.code_in_body:
        new += f"\nRef: {in_text(o.code)}"
        paragraph += (
            f'<p>Ref: [CRM-<span style="font-weight:bold">{o.code[:20]}</span>'
            f"<span>{o.code[20:]}</span>]</p>"
        )
    subject = "Two more shelves"
    html = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        f'{paragraph}<blockquote style="border-left:2px solid #1010ff;padding-left:5px">'
        f"<p>{o.sender_name} wrote on 23.11.2026 10:00:</p>"
        f"<p>{html_lines(o.text)}</p></blockquote></body></html>"
    )
    raw = message(
        [
            ("From", f"Carl Client <{CLIENT}>"),
            ("To", INBOX),
            ("Subject", subject),
            ("Date", "Mon, 23 Nov 2026 10:45:00 +0000"),
            ("Message-ID", new_id("webmail.example.test")),
        ],
        leaf("html", html, "utf-8", "base64"),
    )
    return Reply("code-moved-html", raw, INBOX, subject, new, (o.text.split("\n")[0],), True)


def outlook_sv(o: Original) -> Reply:
    """Swedish Outlook in plain text, ISO-8859-1: 'SV: ' (the subject Q-encoded in Latin-1),
    Från:/Skickat:/Till:/Ämne:, sent to the plain inbox (the address book's entry), so the code
    is in the subject or the quoted body only."""
    new = "Hej Mary,\n\nVi godkänner offerten. Tack för hjälpen!\n\nMed vänlig hälsning\nCarl"
    subject = f"SV: {o.subject}"
    text = (
        f"{new}\n\nFrån: {o.sender_name} <{o.sender}>\nSkickat: den 23 november 2026 10:00\n"
        f"Till: Carl Client <{CLIENT}>\nÄmne: {o.subject}\n\n{o.text}\n"
    )
    raw = message(
        [
            ("From", f"Carl Client <{CLIENT}>"),
            ("To", f'"CRM" <{INBOX}>'),
            ("Subject", email.quoprimime.header_encode(subject.encode("latin-1"), "iso-8859-1")),
            ("Date", "Mon, 23 Nov 2026 11:00:00 +0100"),
            ("Message-ID", new_id("example.test")),
            ("Thread-Index", "AdtOTmJmYWxsc3ZlbnNrYQ=="),
            ("Content-Language", "sv-SE"),
        ],
        leaf("plain", text, "iso-8859-1"),
    )
    return Reply("outlook-sv", raw, INBOX, subject, new, ("Skickat:", o.text), html=False)


def outlook_fi(o: Original) -> Reply:
    """Finnish Outlook: 'VS: ', Lähettäjä:/Lähetetty:/Vastaanottaja:/Aihe:, ISO-8859-15."""
    new = "Kiitos, tilaus on hyväksytty.\n\nTerveisin\nCarl"
    subject = f"VS: {o.subject}"
    text = (
        f"{new}\n\nLähettäjä: {o.sender_name} <{o.sender}>\n"
        "Lähetetty: maanantai 23. marraskuuta 2026 10.00\n"
        f"Vastaanottaja: Carl Client <{CLIENT}>\nAihe: {o.subject}\n\n{o.text}\n"
    )
    raw = message(
        [
            ("From", f"Carl Client <{CLIENT}>"),
            ("To", f"{o.sender_name} <{o.reply_to}>"),
            ("Subject", subject),
            ("Date", "Mon, 23 Nov 2026 12:00:00 +0200"),
            ("Message-ID", new_id("example.test")),
            ("Content-Language", "fi-FI"),
        ],
        leaf("plain", text, "iso-8859-15"),
    )
    return Reply("outlook-fi", raw, o.reply_to, subject, new, ("Lähetetty:", o.text), False)


def outlook_ru(o: Original) -> Reply:
    """Russian Outlook: windows-1251, От:/Отправлено:/Кому:/Тема:, the subject as two UTF-8
    encoded words cut inside a Cyrillic letter."""
    new = "Согласовано, подписываем договор.\n\nС уважением,\nКарл"
    subject = f"RE: {o.subject}"
    text = (
        f"{new}\n\nОт: {o.sender_name} <{o.sender}>\n"
        "Отправлено: 23 ноября 2026 г. 10:00\n"
        f"Кому: Carl Client <{CLIENT}>\nТема: {o.subject}\n\n{o.text}\n"
    )
    raw = message(
        [
            ("From", f"Carl Client <{CLIENT}>"),
            ("To", f"{o.sender_name} <{o.reply_to}>"),
            ("Subject", split_words(subject, "B")),
            ("Date", "Mon, 23 Nov 2026 13:00:00 +0300"),
            ("Message-ID", new_id("example.test")),
            ("Content-Language", "ru-RU"),
        ],
        leaf("plain", text, "windows-1251"),
    )
    return Reply("outlook-ru", raw, o.reply_to, subject, new, ("Отправлено:", o.text), False)


def koi8r_re2(o: Original) -> Reply:
    """An older Russian mail program: KOI8-R in 8 bits, 'Re[2]: ' (a reply counter), the
    'пишет:' attribution, the subject as UTF-8 Q encoded words cut inside a letter."""
    new = "Добрый день!\n\nЦена устраивает, ждём счёт."
    subject = f"Re[2]: {o.subject}"
    text = f"{new}\n\n23.11.2026 10:00, {o.sender_name} пишет:\n{quote(o.text)}\n"
    raw = message(
        [
            ("From", f"Carl Client <{CLIENT}>"),
            ("To", o.reply_to),
            ("Subject", split_words(subject, "Q")),
            ("Date", "Mon, 23 Nov 2026 13:10:00 +0300"),
            ("Message-ID", new_id("example.test")),
            ("X-Mailer", "The Bat! (v10.5.3) Professional"),
        ],
        leaf("plain", text, "koi8-r", "8bit"),
    )
    return Reply("koi8-r", raw, o.reply_to, subject, new, ("пишет:", quote(o.text)), False)


def outlook_ja(o: Original) -> Reply:
    """Japanese Outlook in ISO-2022-JP (7 bits, escape sequences), 差出人:/送信日時:/宛先:/件名:,
    the subject in ISO-2022-JP encoded words."""
    new = "お世話になっております。\n\n納期について承知しました。\n\nカール"
    subject = f"RE: {o.subject}"
    text = (
        f"{new}\n\n差出人: {o.sender_name} <{o.sender}>\n送信日時: 2026年11月23日 10:00\n"
        f"宛先: Carl Client <{CLIENT}>\n件名: {o.subject}\n\n{o.text}\n"
    )
    raw = message(
        [
            ("From", f"Carl Client <{CLIENT}>"),
            ("To", f"{o.sender_name} <{o.reply_to}>"),
            ("Subject", iso2022jp_words(subject)),
            ("Date", "Mon, 23 Nov 2026 19:00:00 +0900"),
            ("Message-ID", new_id("example.test")),
            ("Content-Language", "ja-JP"),
        ],
        leaf("plain", text, "iso-2022-jp", "7bit"),
    )
    return Reply("outlook-ja", raw, o.reply_to, subject, new, ("送信日時:", o.text), False)


def shift_jis(o: Original) -> Reply:
    """A Japanese mail program in Shift_JIS (base64), Gmail's Japanese attribution
    ('2026年11月23日(月) 10:00 Mary <…>:'), the subject as UTF-8 words cut in a character."""
    new = "ありがとうございます。\n来週の月曜日で大丈夫です。"
    subject = f"Re: {o.subject}"
    text = f"{new}\n\n2026年11月23日(月) 10:00 {o.sender_name} <{o.sender}>:\n\n{quote(o.text)}\n"
    raw = message(
        [
            ("From", f"Carl Client <{CLIENT}>"),
            ("To", o.reply_to),
            ("Subject", split_words(subject, "B")),
            ("Date", "Mon, 23 Nov 2026 19:10:00 +0900"),
            ("Message-ID", new_id("example.test")),
            ("In-Reply-To", o.message_id),
        ],
        leaf("plain", text, "Shift_JIS", "base64"),
    )
    return Reply("shift-jis", raw, o.reply_to, subject, new, (quote(o.text),), html=False)


@dataclass(frozen=True)
class Style:
    """A mail program, and the mail the CRM sends that it answers."""

    reply: Callable[[Original], Reply]
    subject: str
    text: str


STYLES = (
    Style(outlook_en, "Your quote", "Hello Carl,\nplease find our quote attached."),
    Style(outlook_de, "Ihr Angebot", "Hallo Carl,\nanbei unser Angebot."),
    Style(gmail, "Shelving quote", "Hello Carl,\nhere is the shelving quote."),
    Style(apple_mail, "Delivery", "Hello Carl,\nwhen should we deliver?"),
    Style(code_moved_text, "Order 1042", "Hello Carl,\nyour order 1042 is confirmed."),
    Style(code_moved_html, "Shelves", "Hello Carl,\nthe shelves are reserved."),
    Style(outlook_sv, "Offert för lagerhyllor", "Hej Carl,\nhär är offerten för hyllorna."),
    Style(outlook_fi, "Tarjous", "Hei Carl,\ntässä tarjous."),
    Style(outlook_ru, "Коммерческое предложение", "Здравствуйте, Карл!\nНаправляем КП."),
    Style(koi8r_re2, "Счёт на оплату", "Здравствуйте, Карл!\nСчёт во вложении."),
    Style(outlook_ja, "お見積もりの件", "カール様\nお見積もりをお送りします。"),
    Style(shift_jis, "納品日について", "カール様\n納品日をご確認ください。"),
)


# --- the hub, the records, the ways in ----------------------------------------------------------


def words(text: str) -> str:
    """Text with its whitespace normalised: line breaks are the renderer's business."""
    return " ".join(text.split())


@dataclass
class Crm:
    mary_id: str
    mary: str  # her token
    admin: str  # a CRM admin's token
    contact_id: str
    deals: list[dict[str, Any]]


async def crm_with_deals(hub: HubHarness, n: int) -> Crm:
    """Mary, responsible for one contact and ``n`` deals with that contact, all of them with
    the same address: only the reply's code or thread can tell the deals apart."""
    mary_id, mary = await hub.create_user("mary", first_name="Mary", last_name="Jones")
    _, admin = await hub.create_user("crmadmin", admin=True)
    contact = await hub.request(
        "POST",
        "/api/v1/crm/contacts",
        token=mary,
        json={"first_name": "Carl", "last_name": "Client", "emails": [{"value": CLIENT}]},
    )
    assert contact.status == 201, contact.body
    deals = []
    for i in range(n):
        deal = await hub.request(
            "POST",
            "/api/v1/crm/deals",
            token=mary,
            json={"title": f"Deal {i}", "contact_ids": [contact.body["id"]]},
        )
        assert deal.status == 201, deal.body
        deals.append(deal.body)
    return Crm(mary_id, mary, admin, contact.body["id"], deals)


async def set_code_in(hub: HubHarness, crm: Crm, code_in: str) -> None:
    changed = await hub.request(
        "PATCH", "/api/v1/mail/settings", token=crm.admin, json={"code_in": code_in}
    )
    assert changed.status == 200 and changed.body["code_in"] == code_in, changed.body


async def send(
    hub: HubHarness, crm: Crm, sink: Sink, deal: dict[str, Any], subject: str, text: str
) -> Original:
    ctx = {"mary": crm.mary, "deal": deal}
    sent = await send_from_deal(hub, ctx, sink, subject=subject, text=text)
    return Original.of(sent)


async def smtp_deliver(hub: HubHarness, raw: bytes, to: str) -> str:
    errors, response = await aiosmtplib.send(
        raw,
        sender=CLIENT,
        recipients=[to],
        hostname="127.0.0.1",
        port=hub.services.mail.ports["smtp"],
    )
    assert not errors, errors
    return response


async def outcomes(hub: HubHarness, n: int) -> None:
    """``n`` messages stored, every one of them at its outcome."""
    raw = hub.services.store["mail_raw"]

    async def all_in() -> bool:
        return await raw.count_documents({}) >= n

    await wait_for(all_in, timeout=30)
    await settled(hub)


async def incoming_on(hub: HubHarness, owner_id: str) -> list[dict[str, Any]]:
    found = hub.services.store["crm_activities"].find(
        {"owner_id": owner_id, "direction": "incoming"}
    )
    return [a async for a in found]


def deal_incoming(client: SocketClient) -> int:
    return int(client.crm_counters().get("deal", {}).get("incoming", 0))


# --- every mail program, both ways in, both places for the code -------------------------------


@pytest.mark.parametrize("code_in", ["subject", "body"])
@pytest.mark.parametrize("way", ["smtp", "imap"])
async def test_replies_from_each_mail_program_land_on_their_deal_and_light_the_counter(
    mailhub: HubHarness, sink: Sink, request: pytest.FixtureRequest, way: str, code_in: str
) -> None:
    hub = mailhub
    server: Dovecot | None = None
    crm = await crm_with_deals(hub, len(STYLES))
    await set_code_in(hub, crm, code_in)
    mary = await hub.connect(crm.mary)
    await mary.wait_for("snapshot")
    replies: list[tuple[dict[str, Any], Original, Reply]] = []
    for deal, style in zip(crm.deals, STYLES, strict=True):
        original = await send(hub, crm, sink, deal, style.subject, style.text)
        # the code is where the setting puts it (and in the Reply-To either way)
        assert (in_text(original.code) in original.subject) == (code_in == "subject")
        assert original.code_in_body == (code_in == "body")
        if code_in == "body":
            assert body_line(original.code) in original.text
        replies.append((deal, original, style.reply(original)))
    assert deal_incoming(mary) == 0

    if way == "smtp":
        for _, _, reply in replies:
            answer = await smtp_deliver(hub, reply.raw, reply.to)
            assert "stored as" in answer, (reply.style, answer)
    else:
        server = request.getfixturevalue("dovecot")
        assert server is not None
        for _, _, reply in replies:
            await append(server, reply.raw)
        await add_mailbox(hub, server)
    await outcomes(hub, len(replies))
    store = hub.services.store
    outcome = [
        (d["status"], d.get("result")) async for d in store["mail_raw"].find({}, {"data": 0})
    ]
    for deal, original, reply in replies:
        found = await incoming_on(hub, deal["id"])
        assert len(found) == 1, (reply.style, found, outcome)
        activity = found[0]
        mail = activity["mail"]
        context = (reply.style, activity["subject"], activity["description"], mail["quoted"])
        raw = await store["mail_raw"].find_one({"_id": mail["raw_id"]})
        assert raw is not None and raw["status"] == "done", context
        assert raw["source"]["kind"] == way and raw["result"]["how"] == "code", raw
        assert mail["match"] == "code" and not mail["flagged"], context
        assert mail["in_reply_to_activity"] is not None
        outgoing = await store["crm_activities"].find_one({"_id": mail["in_reply_to_activity"]})
        assert outgoing is not None and outgoing["mail"]["code"] == original.code
        assert activity["subject"] == reply.subject, context
        assert not activity["completed"] and activity["responsible_id"] == crm.mary_id
        assert words(activity["description"]) == words(reply.new_text), context
        for piece in reply.quoted:
            assert words(piece) in words(mail["quoted"]), (piece, *context)
        assert (mail["html"] is not None) == reply.html, context
        if reply.html:
            assert words(reply.new_text.split("\n")[0]) in words(mail["html"])
            assert "<script" not in mail["html"] and "<style" not in mail["html"]
        timeline = await hub.request(  # shown as incoming over REST
            "GET",
            f"/api/v1/crm/activities?owner_type=deal&owner_id={deal['id']}&status=all",
            token=crm.mary,
        )
        (shown,) = [a for a in timeline.body["activities"] if a["direction"] == "incoming"]
        assert shown["id"] == activity["_id"] and shown["state"] == "incoming"
    # nothing fell through to the contact by its sender address
    assert await incoming_on(hub, crm.contact_id) == []
    # Mary's browser sees it live: one incoming (green) activity per reply, all on deals
    await mary.wait_until(lambda: deal_incoming(mary) == len(STYLES), timeout=20)
    assert mary.crm_counters()["deal"]["colour"] == "green"
    assert not mary.crm_counters().get("contact", {}).get("incoming")

    if server is not None:  # every one delivered, so every one moved out of the collected folder

        async def all_moved() -> bool:
            return await count(server, "INBOX") == 0

        await wait_for(all_moved)
        assert await count(server, "Processed") == len(STYLES)


# --- 30 MB: over the limit --------------------------------------------------------------------


def with_attachment(reply: Reply, name: str, content_type: str, data: bytes) -> bytes:
    """``reply`` with a base64 attachment added, as the program that wrote it would."""
    head, _, body = reply.raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    top = [
        line
        for line in lines
        if not line.lower().startswith((b"content-type", b"content-transfer", b"mime-version"))
        and not line.startswith(b"\t")
    ]
    inner = b"\r\n".join(
        line
        for line in lines
        if line.lower().startswith((b"content-type", b"content-transfer")) or line.startswith(b"\t")
    )
    attachment = (
        f'Content-Type: {content_type}; name="{name}"\r\n'
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + base64.encodebytes(data).replace(b"\n", b"\r\n")
    mixed = multipart("mixed", "_004_mixed_boundary_", inner + b"\r\n\r\n" + body, attachment)
    return b"\r\n".join(top) + b"\r\nMIME-Version: 1.0\r\n" + mixed


def thirty_megabytes() -> bytes:
    # incompressible-looking, like a real scan, and no fewer than 30 MB
    return os.urandom(1 << 20) * 30


async def test_a_30_mb_attachment_gets_552_over_smtp_and_nothing_is_stored(
    mailhub: HubHarness, sink: Sink
) -> None:
    hub = mailhub
    assert hub.services.settings.mail_max_message_bytes == MAX_BYTES  # the default
    crm = await crm_with_deals(hub, 1)
    original = await send(hub, crm, sink, crm.deals[0], "Your quote", "Hello Carl")
    reply = outlook_en(original)
    big = with_attachment(reply, "signed-contract.pdf", "application/pdf", thirty_megabytes())
    assert len(big) > MAX_BYTES
    port = hub.services.mail.ports["smtp"]
    # a client that declares the size (aiosmtplib does, from the SIZE the listener announces)
    with pytest.raises(aiosmtplib.SMTPResponseException) as declared:
        await aiosmtplib.send(
            big, sender=CLIENT, recipients=[reply.to], hostname="127.0.0.1", port=port
        )
    assert declared.value.code == 552
    # a client that does not: the whole 40 MB goes over the wire, then 552
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
    await smtp.connect()
    ehlo = await smtp.ehlo()
    assert f"SIZE {MAX_BYTES}" in ehlo.message
    await smtp.mail(CLIENT)
    await smtp.rcpt(reply.to)
    with pytest.raises(aiosmtplib.SMTPResponseException) as sent_anyway:
        await smtp.data(big)
    assert sent_anyway.value.code == 552
    # the session goes on, and the same reply without the attachment is taken
    await smtp.mail(CLIENT)
    await smtp.rcpt(reply.to)
    taken = await smtp.data(reply.raw)
    assert taken.code == 250 and "stored as" in taken.message
    await smtp.quit()
    await outcomes(hub, 1)
    store = hub.services.store
    assert await store["mail_raw"].count_documents({}) == 1
    assert await store["mail_raw_files.files"].count_documents({}) == 0  # no 30 MB anywhere
    (activity,) = await incoming_on(hub, crm.deals[0]["id"])
    assert activity["mail"]["attachments"] == []


async def test_a_30_mb_mail_in_the_mailbox_is_skipped_and_the_next_one_still_arrives(
    mailhub: HubHarness, sink: Sink, dovecot: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    hub = mailhub
    assert hub.services.settings.mail_max_message_bytes == MAX_BYTES  # the default
    crm = await crm_with_deals(hub, 2)
    mary = await hub.connect(crm.mary)
    await mary.wait_for("snapshot")
    first = await send(hub, crm, sink, crm.deals[0], "Your quote", "Hello Carl")
    second = await send(hub, crm, sink, crm.deals[1], "Shelving quote", "Hello again")
    big = with_attachment(outlook_en(first), "scan.pdf", "application/pdf", thirty_megabytes())
    await append(dovecot, big)  # UID 1: over the limit
    normal = gmail(second)
    await append(dovecot, normal.raw)  # UID 2: behind it
    caplog.set_level(logging.WARNING, logger="server.mailbridge.imap")
    _, box_id = await add_mailbox(hub, dovecot)
    await outcomes(hub, 1)
    await mary.wait_until(lambda: deal_incoming(mary) == 1, timeout=20)
    (activity,) = await incoming_on(hub, crm.deals[1]["id"])
    assert activity["subject"] == normal.subject and activity["mail"]["match"] == "code"
    assert await incoming_on(hub, crm.deals[0]["id"]) == []
    store = hub.services.store
    (skipped,) = [s async for s in store["mail_skipped"].find({})]
    assert skipped["mailbox_id"] == box_id and skipped["uid"] == 1
    assert skipped["size"] > MAX_BYTES and f"{MAX_BYTES}-byte limit" in skipped["reason"]
    assert any("UID 1 skipped" in r.getMessage() for r in caplog.records)
    assert await store["mail_raw"].count_documents({}) == 1  # never downloaded

    async def past_both() -> bool:  # the collector moved on past the skipped one
        boxes = await hub.request("GET", "/api/v1/mail/mailboxes", token=crm.admin)
        (box,) = boxes.body["mailboxes"]
        assert not box["state"].get("last_error"), box
        return bool(box["state"].get("last_uid") == 2)

    await wait_for(past_both)

    async def only_the_big_one_left() -> bool:
        return await count(dovecot, "INBOX") == 1 and await count(dovecot, "Processed") == 1

    await wait_for(only_the_big_one_left)


# --- MIME bombs and a zip bomb ------------------------------------------------------------------


def many_parts(n: int) -> bytes:
    """A flat multipart with thousands of tiny parts (the existing test nests deep instead)."""
    parts = b"".join(b"--p\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(n))
    return (
        crlf(
            f"From: {CLIENT}\nTo: {INBOX}\nSubject: many parts\n"
            f"Message-ID: {new_id('example.test')}\nMIME-Version: 1.0\n"
            'Content-Type: multipart/mixed; boundary="p"\n\n'
        )
        + parts
        + b"--p--\r\n"
    )


def many_attachments(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = CLIENT
    msg["To"] = INBOX
    msg["Subject"] = "many attachments"
    msg["Message-ID"] = new_id("example.test")
    msg.set_content("see attached")
    for i in range(n):
        msg.add_attachment(
            b"%d" % i, maintype="application", subtype="octet-stream", filename=f"f{i}.bin"
        )
    return msg.as_bytes()


def forwarded_inside_forwarded(depth: int) -> bytes:
    """Messages attached inside attached messages (message/rfc822), ``depth`` deep."""
    inner = crlf(f"From: {CLIENT}\nSubject: innermost\n\nhello\n")
    for i in range(depth):
        inner = (
            crlf(
                f"From: {CLIENT}\nTo: {INBOX}\nSubject: Fwd {i}\nMIME-Version: 1.0\n"
                f'Content-Type: multipart/mixed; boundary="f{i}"\n\n--f{i}\n'
                "Content-Type: message/rfc822\n\n"
            )
            + inner
            + f"\r\n--f{i}--\r\n".encode()
        )
    return crlf(f"Message-ID: {new_id('example.test')}\n") + inner


BOMBS = {  # each with the reason it is refused for
    "5000 parts": (many_parts(5000), "more than 200 MIME parts"),
    "60 attachments": (many_attachments(60), "more than 50 attachments"),
    "attached messages 12 deep": (forwarded_inside_forwarded(12), "nested more than 10 deep"),
}


async def test_mime_bombs_of_other_shapes_get_552_over_smtp(mailhub: HubHarness) -> None:
    port = mailhub.services.mail.ports["smtp"]
    for shape, (bomb, reason) in BOMBS.items():
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await aiosmtplib.send(
                bomb, sender=CLIENT, recipients=[INBOX], hostname="127.0.0.1", port=port
            )
        assert refused.value.code == 552, shape
        assert refused.value.message.startswith("5.3.4 Message refused: "), shape
        assert reason in refused.value.message, (shape, refused.value.message)
    assert await mailhub.services.store["mail_raw"].count_documents({}) == 0


async def test_a_mime_bomb_in_the_mailbox_is_refused_kept_unassignable_and_blocks_nothing(
    mailhub: HubHarness, sink: Sink, dovecot: Dovecot
) -> None:
    hub = mailhub
    crm = await crm_with_deals(hub, 1)
    original = await send(hub, crm, sink, crm.deals[0], "Your quote", "Hello Carl")
    await append(dovecot, BOMBS["5000 parts"][0])
    reply = apple_mail(original)
    await append(dovecot, reply.raw)
    await add_mailbox(hub, dovecot)
    await outcomes(hub, 2)
    store = hub.services.store
    refused = await store["mail_raw"].find_one({"status": "refused"})
    assert refused is not None and "more than 200 MIME parts" in refused["result"]["reason"]
    (activity,) = await incoming_on(hub, crm.deals[0]["id"])
    assert activity["subject"] == reply.subject
    unmatched = await hub.request("GET", "/api/v1/mail/unmatched", token=crm.admin)
    (listed,) = unmatched.body["mails"]
    assert listed["id"] == refused["_id"] and listed["reason"].startswith("refused: ")
    assigned = await hub.request(
        "POST",
        f"/api/v1/mail/unmatched/{refused['_id']}/assign",
        token=crm.admin,
        json={"record_type": "deal", "record_id": crm.deals[0]["id"]},
    )
    assert assigned.status == 409 and "refused" in assigned.body["detail"], assigned.body
    assert len(await incoming_on(hub, crm.deals[0]["id"])) == 1

    async def the_bomb_stays() -> bool:  # the reply is moved, the bomb stays in the folder
        return await count(dovecot, "INBOX") == 1 and await count(dovecot, "Processed") == 1

    await wait_for(the_bomb_stays)


def zip_bomb(expanded: int) -> bytes:
    """One deflated member of ``expanded`` zero bytes: a thousand times its own size."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("report.csv", "w", force_zip64=True) as member,
    ):
        chunk = bytes(1 << 20)
        for _ in range(expanded >> 20):
            member.write(chunk)
    return out.getvalue()


async def test_a_zip_bomb_is_taken_and_kept_packed_as_sent(mailhub: HubHarness, sink: Sink) -> None:
    hub = mailhub
    crm = await crm_with_deals(hub, 1)
    original = await send(hub, crm, sink, crm.deals[0], "Your quote", "Hello Carl")
    bomb = zip_bomb(128 << 20)
    assert len(bomb) < 1 << 20  # 128 MiB when unpacked
    reply = gmail(original)
    raw = with_attachment(reply, "report.zip", "application/zip", bomb)
    await smtp_deliver(hub, raw, reply.to)
    await outcomes(hub, 1)
    (activity,) = await incoming_on(hub, crm.deals[0]["id"])
    assert words(activity["description"]) == words(reply.new_text)
    (attachment,) = activity["mail"]["attachments"]
    assert attachment["filename"] == "report.zip" and attachment["size"] == len(bomb)
    async with hub.http.get(
        f"{hub.base_url}/api/v1/mail/attachments/{attachment['id']}",
        headers={"Authorization": f"Bearer {crm.mary}"},
    ) as download:
        assert download.status == 200
        assert await download.read() == bomb  # the archive as sent, never unpacked
