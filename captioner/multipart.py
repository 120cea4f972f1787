"""A small multipart/form-data parser (RFC 7578) for the caption server's uploads.

The standard library's cgi module, which used to do this, is deprecated and gone in Python 3.13; the email
package parses MIME but treats the body as text lines. Form uploads need much less than either: split the
body on the boundary, read each part's Content-Disposition, keep the bytes exactly as sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data; the message says what is wrong."""


@dataclass
class FormPart:
    name: str
    data: bytes
    filename: str | None = None  # present for file fields
    content_type: str = "text/plain"


def _header_params(name: str, value: str) -> Message:
    """A header parsed the way email parses MIME headers: quoted parameters, RFC 2231 encodings."""
    message = Message()
    message[name] = value
    return message


def boundary_of(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data; boundary=...` Content-Type; MultipartError otherwise."""
    header = _header_params("content-type", content_type)
    if header.get_content_type() != "multipart/form-data":
        raise MultipartError(f"expected Content-Type multipart/form-data, got {content_type or 'none'!r}")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise MultipartError("multipart/form-data without a valid boundary parameter")
    return boundary.encode("latin-1")


def parse_form(body: bytes, content_type: str, max_parts: int = 16) -> dict[str, FormPart]:
    """multipart/form-data body -> {field name: part}. A repeated field keeps its first part."""
    delimiter = b"--" + boundary_of(content_type)
    sections = body.split(delimiter)
    # sections[0] is the preamble (ignored); the last delimiter is followed by "--" (the epilogue)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise MultipartError("multipart body is truncated or has no parts (no closing boundary)")
    parts = sections[1:-1]
    if len(parts) > max_parts:
        raise MultipartError(f"too many form fields ({len(parts)} > {max_parts})")
    form: dict[str, FormPart] = {}
    for raw in parts:
        part = _parse_part(raw)
        form.setdefault(part.name, part)
    return form


def _parse_part(raw: bytes) -> FormPart:
    if not raw.startswith(b"\r\n") or not raw.endswith(b"\r\n"):
        raise MultipartError("malformed multipart part (boundary not followed by CRLF)")
    head, separator, data = raw[2:-2].partition(b"\r\n\r\n")
    if not separator:
        raise MultipartError("malformed multipart part (no blank line after its headers)")
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n"):
        key, colon, value = line.decode("utf-8", "replace").partition(":")
        if not colon:
            raise MultipartError(f"malformed multipart header line {line[:60]!r}")
        headers[key.strip().lower()] = value.strip()
    disposition = _header_params("content-disposition", headers.get("content-disposition", ""))
    if disposition.get_content_disposition() != "form-data" or not disposition.get_param("name",
                                                                                         header="content-disposition"):
        raise MultipartError("multipart part without 'Content-Disposition: form-data; name=...'")
    name = disposition.get_param("name", header="content-disposition")
    filename = disposition.get_filename()
    return FormPart(str(name), data, filename, headers.get("content-type", "text/plain"))
