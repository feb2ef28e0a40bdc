"""File shapes at the API boundary."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class FileRef(BaseModel):
    """A file attached to a message, as every transport shows it."""

    id: str
    name: str
    size: int
    content_type: str = Field(
        description="image/png, image/jpeg, image/gif or image/webp when the content is such "
        "an image (recognised from its bytes, not from what the uploader said); otherwise "
        "application/octet-stream"
    )
    image: bool = Field(description="A raster image the web client may show inline")


class FileOut(FileRef):
    chat_id: str | None = Field(
        description="The chat of the message it is attached to; null until it is sent"
    )
    created_at: datetime

    @classmethod
    def from_gridfs(cls, doc: dict[str, Any]) -> FileOut:
        meta = doc.get("metadata") or {}
        return cls(
            id=str(doc["_id"]),
            name=str(doc.get("filename") or "file"),
            size=int(doc.get("length", 0)),
            content_type=str(meta.get("content_type") or "application/octet-stream"),
            image=bool(meta.get("image")),
            chat_id=meta.get("chat_id"),
            created_at=doc["uploadDate"],
        )

    def ref(self) -> FileRef:
        return FileRef(
            id=self.id,
            name=self.name,
            size=self.size,
            content_type=self.content_type,
            image=self.image,
        )
