"""File routes: upload, download (members of the file's chat), and the signed links and
XEP-0363 upload slots of Jabber clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from aiohttp import web
from pydantic import Field, StringConstraints

from server.files.models import FileOut
from server.files.rules import content_disposition
from server.files.service import too_large
from server.im.models import Strict
from server.services import services
from server.web.api import Call
from server.web.routes import api

TAG = "files"
CHUNK_BYTES = 64 * 1024
# A file is never shown as a page, nor run: images render inline in a sandbox, everything
# else downloads.
FILE_POLICY = "default-src 'none'; img-src 'self'; sandbox; frame-ancestors 'none'"


class UploadQuery(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=1000)] = Field(
        description="The file's name (directories and control characters are dropped)"
    )


def _chunks(request: web.Request) -> AsyncIterator[bytes]:
    return request.content.iter_chunked(CHUNK_BYTES)


def _check_length(request: web.Request, limit: int) -> None:
    """A body announced larger than the limit is refused before any of it is read."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)


@api.route(
    "POST",
    "/api/v1/files",
    summary="Upload a file to send in a chat",
    tag=TAG,
    query=UploadQuery,
    response=FileOut,
    status=201,
    errors=(413, 429),
)
async def upload_file(call: Call) -> FileOut:
    """The request body is the file itself (any content type; not multipart), streamed
    into the database. Larger than `PORTALHUB_FILE_MAX_BYTES`: `413 file-too-large`, and
    nothing is kept. The file is the uploader's until it is sent: `POST /api/v1/im/messages`
    with its id in `file_ids` makes it the chat's."""
    files = services(call.request).im.files
    _check_length(call.request, files.max_bytes)
    name = call.query_as(UploadQuery).name
    return await files.upload(call.user_id, name, _chunks(call.request))


async def _serve(request: web.Request, found: FileOut) -> web.StreamResponse:
    files = services(request).im.files
    grid = await files.open(found.id)
    response = web.StreamResponse(
        headers={
            # The type recognised from the bytes, never the uploader's claim; only raster
            # images are shown inline.
            "Content-Type": found.content_type,
            "Content-Disposition": content_disposition(found.name, found.image),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": FILE_POLICY,
            "Cache-Control": "private, max-age=86400",
        }
    )
    response.content_length = found.size
    await response.prepare(request)
    while chunk := await grid.readchunk():
        await response.write(chunk)
    await response.write_eof()
    return response


@api.route(
    "GET",
    "/api/v1/files/{file_id}",
    summary="Download a file",
    tag=TAG,
    errors=(403, 404),
    extra_responses={"200": {"description": "The file's bytes"}},
)
async def download_file(call: Call) -> web.StreamResponse:
    """For the members of the chat it was sent to (and its uploader before it is sent);
    others get 403. Images (PNG, JPEG, GIF, WebP, recognised from their bytes) come
    `inline`, everything else as an `attachment` of type `application/octet-stream`."""
    assert call.user is not None
    found = await services(call.request).im.file_for(call.user, call.path("file_id"))
    return await _serve(call.request, found)


@api.route(
    "GET",
    "/files/{file_id}/{signature}/{name}",
    summary="Download a file by its signed link (Jabber clients)",
    tag=TAG,
    auth="none",
    errors=(404,),
    extra_responses={"200": {"description": "The file's bytes"}},
)
async def download_linked_file(call: Call) -> web.StreamResponse:
    """The link a Jabber client gets for a file (an XEP-0363 GET URL, an out-of-band URL):
    no session needed, whoever holds the link may download (docs/xmpp.md)."""
    files = services(call.request).im.files
    found = await files.by_link(call.path("file_id"), call.path("signature"))
    return await _serve(call.request, found)


@api.route(
    "PUT",
    "/files/upload/{token}",
    summary="Upload into an XEP-0363 slot (Jabber clients)",
    tag=TAG,
    auth="none",
    status=201,
    errors=(400, 403, 413, 429),
)
async def put_slot(call: Call) -> web.StreamResponse:
    """The PUT URL of a slot a Jabber client asked for: once, within five minutes, exactly
    the size it asked for."""
    files = services(call.request).im.files
    _check_length(call.request, files.max_bytes)
    await files.put(call.path("token"), _chunks(call.request))
    return web.Response(status=201)
