"""Pure rules about files: names, types shown inline, signed links, links in message text."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import unicodedata
from urllib.parse import quote

MAX_NAME_CHARS = 200
OCTET_STREAM = "application/octet-stream"
# Raster formats a browser shows as an image and nothing else: no SVG (it runs script),
# no HTML, whatever the uploader claimed. Recognised by their first bytes.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
SNIFF_BYTES = 16
LINK_PREFIX = "/files/"
# Binds a MAC to this use, so the secret signs nothing else by mistake.
_LINK_DOMAIN = b"portalhub file link v1\0"
_SIG_CHARS = 32  # base64url characters of the MAC kept: 192 bits


def image_type(head: bytes) -> str | None:
    """The image type of content starting with ``head`` (at least ``SNIFF_BYTES`` of it,
    or all of it), when it is a raster image shown inline; else None."""
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def clean_name(name: str | None) -> str:
    """A file name fit to show and to put in a header: no directories, no control or
    format characters, not empty, at most ``MAX_NAME_CHARS``."""
    base = re.split(r"[/\\]", name or "")[-1]
    kept = "".join(
        c for c in unicodedata.normalize("NFC", base) if unicodedata.category(c)[0] != "C"
    ).strip(" .")
    return kept[:MAX_NAME_CHARS] or "file"


def content_disposition(name: str, inline: bool) -> str:
    """RFC 6266: an ASCII fallback and the UTF-8 name (RFC 8187)."""
    fallback = re.sub(r"[^A-Za-z0-9._ -]", "_", name) or "file"
    kind = "inline" if inline else "attachment"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def sign(secret: bytes, file_id: str) -> str:
    mac = hmac.new(secret, _LINK_DOMAIN + file_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode()[:_SIG_CHARS]


def verify(secret: bytes, file_id: str, signature: str) -> bool:
    # As bytes: compare_digest refuses str with non-ASCII characters (a link can hold any).
    return hmac.compare_digest(sign(secret, file_id).encode(), signature.encode())


def link_path(secret: bytes, file_id: str, name: str) -> str:
    """The path of a file's signed link: whoever has it may download the file."""
    return f"{LINK_PREFIX}{file_id}/{sign(secret, file_id)}/{quote(name, safe='')}"


_LINK = re.compile(rf"/files/([0-9a-f]{{24}})/([A-Za-z0-9_-]{{{_SIG_CHARS}}})/[^\s<>\"]*")


def links_in(text: str, base_url: str) -> list[tuple[str, str, str]]:
    """The signed file links of this hub in ``text``: (the whole URL, file id, signature)."""
    found = []
    base = base_url.rstrip("/")
    for match in re.finditer(re.escape(base) + _LINK.pattern, text):
        found.append((match.group(0), match.group(1), match.group(2)))
    return found


def without_links(text: str, urls: list[str]) -> str:
    """The text of a message once the links of its attached files are taken out of it (a
    Jabber client sends a file as a message whose body is its URL)."""
    for url in urls:
        text = text.replace(url, "")
    return text.strip()
