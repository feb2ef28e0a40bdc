"""Security headers on every answer: the web page's content security policy, no framing,
no content sniffing, no referrer.

The page's policy allows what the built web client (``web-client/``) uses and nothing else:

- scripts, styles, fonts and images from the hub's own origin; the bundle has no inline
  script, and the hub serves nothing from elsewhere;
- ``connect-src 'self'``: the REST API and Socket.IO (CSP level 3 browsers count the
  same-origin ``ws:``/``wss:`` as ``'self'``);
- ``style-src 'unsafe-inline'`` and ``data:`` images and fonts for received mail: its HTML is
  shown in an ``<iframe sandbox srcdoc>``, which inherits this policy on top of its own
  (``default-src 'none'; img-src data: cid:; style-src 'unsafe-inline'; font-src data:``).
  The sandbox runs no script, so inline styles are all a mail gets;
- ``frame-ancestors 'none'`` (and ``X-Frame-Options: DENY`` for older browsers): no other
  site may frame the portal.

Other answers (JSON, problem documents, static files) get ``default-src 'none'``: rendered as
a page by mistake, they load and run nothing.
"""

from __future__ import annotations

from aiohttp import web

PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
OTHER_POLICY = "default-src 'none'; frame-ancestors 'none'"

COMMON = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs for every answer, static files and errors included."""
    headers = response.headers
    for name, value in COMMON.items():
        headers.setdefault(name, value)
    page = (response.content_type or "").lower() == "text/html"
    headers.setdefault("Content-Security-Policy", PAGE_POLICY if page else OTHER_POLICY)


def install(app: web.Application) -> None:
    app.on_response_prepare.append(add_security_headers)
