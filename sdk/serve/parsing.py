"""The requests `moon3 serve` reads and the bodies it writes: JSON in and out, multipart photos,
fields checked with errors that name the field and the item (`HttpError` for the request,
`InvalidInputError` per item).

Imports the web stack only inside `read_request` (multipart); never imports torch.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Sequence

import numpy as np

from sdk.errors import BackendUnavailableError, InvalidInputError, SdkError
from sdk.ops import check_dim, l2_normalize
from sdk.serve.batch import BatchItem

__all__ = ["ERROR_TYPES", "HttpError", "dumps", "loads", "parse_openai_input", "parse_products", "read_request"]

ENCODINGS = ("float", "base64")
ITEM_FIELDS = ("id", "title", "image", "image_file", "trace")
EMBED_FIELDS = ("items", "dimensions", "encoding_format")
# the request fields the OpenAI embeddings API defines; `model` and `user` are accepted and ignored
OPENAI_FIELDS = ("input", "model", "dimensions", "encoding_format", "user")
REASON_FIELDS = ("task", "title", "image", "key", "question", "max_new_tokens")


def need_serve_extra(exc: ImportError) -> BackendUnavailableError:
    return BackendUnavailableError(f"`moon3 serve` needs the web stack ({exc}): pip install 'moon3-sdk[serve]'")


try:  # optional ([serve] extra): JSON in and out in a few microseconds instead of ~0.3 ms a vector
    import orjson as _orjson
except ImportError:  # pragma: no cover - the standard library does the same, slower
    _orjson = None


def dumps(payload: Any) -> bytes:
    """A response body: compact UTF-8 JSON (orjson when installed, else the standard library)."""
    if _orjson is not None:
        try:
            return _orjson.dumps(payload)
        except TypeError:  # orjson.JSONEncodeError: an int over 64 bits, a lone surrogate, ...
            pass
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def loads(body: bytes | str) -> Any:
    """A request body's JSON, as `json.loads` gives it. orjson parses what it can; what it refuses
    (NaN, UTF-16, bad JSON) goes to the standard library, which accepts or raises as before, and
    so does a body where orjson read an integer beyond 64 bits as a float (an id of 2**70)."""
    if _orjson is not None:
        try:
            data = _orjson.loads(body)
        except ValueError:  # orjson.JSONDecodeError
            pass
        else:
            if not _has_huge_float(data):
                return data
    return json.loads(body)


def _has_huge_float(value: Any) -> bool:
    """Whether parsed JSON holds a float of magnitude >= 2**63 (where orjson turns integers into floats)."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is float:
            if not -_HUGE < v < _HUGE:
                return True
        elif t is dict:
            stack.extend(v.values())
        elif t is list:
            stack.extend(v)
    return False


_HUGE = 2.0**63


class HttpError(SdkError):
    """A request-level error: answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "bad_request", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers or {}


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                503: "server_error"}


def decode_image(value: Any, where: str) -> bytes:
    """A photo sent as base64 (optionally a data: URL) -> its encoded bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}: must be a base64 string of the encoded photo, got {kind(value)}")
    s = value.strip()
    if "://" in s[:12] or s[:5].lower() == "file:":
        raise InvalidInputError(f"{where}: looks like a URL ({s[:40]!r}); the server never fetches URLs or "
                                "opens paths: send the photo's bytes (base64 in JSON, or a multipart file)")
    if s[:5].lower() == "data:":
        head, comma, s = s.partition(",")
        if not comma or ";base64" not in head.lower():
            raise InvalidInputError(f"{where}: a data URL must be base64 (data:image/jpeg;base64,...), got {head[:40]!r}")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        try:  # MIME-style line breaks
            data = base64.b64decode("".join(s.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInputError(f"{where}: not valid base64 ({exc})") from None
    if not data:
        raise InvalidInputError(f"{where}: empty; expected an encoded photo (JPEG/PNG/WebP) in base64")
    return data


def kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def text_field(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}: must be a string or null, got {kind(value)}")
    return value


def dims(value: Any, emb: Any) -> int | None:
    """The request's `dimensions` checked against the embedder `emb` (None: full width)."""
    if value is None:
        return None
    try:
        return check_dim(value, emb.dim, hint=f"the trained widths are {list(emb.matryoshka_dims)}")
    except InvalidInputError as exc:
        raise HttpError(400, str(exc).replace("dim ", "dimensions ", 1), param="dimensions") from None


def encoding(value: Any) -> str:
    if value is None:
        return "float"
    if value not in ENCODINGS:
        raise HttpError(400, f"encoding_format must be one of {list(ENCODINGS)}, got {value!r}",
                        param="encoding_format")
    return value


def vector_out(vec: np.ndarray, dim: int | None, encoding: str) -> Any:
    v = vec if dim is None or dim == len(vec) else l2_normalize(vec[None], dim)[0]  # Matryoshka prefix
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode("ascii")
    return v.tolist()


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes (413) before reading it all."""
    size = request.headers.get("content-length")
    if size is not None:
        try:
            declared = int(size)
        except ValueError:
            raise HttpError(400, f"content-length is not a number: {size!r}") from None
        if declared > limit:
            raise HttpError(413, f"the request body is {declared} bytes; the limit is {limit} (--max-body-mb)",
                            kind="too_large")
    chunks, got = [], 0
    async for chunk in request.stream():
        got += len(chunk)
        if got > limit:
            raise HttpError(413, f"the request body is over the limit of {limit} bytes (--max-body-mb)",
                            kind="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(request: Any, max_body_bytes: int, max_items: int) -> tuple[dict, dict[str, bytes] | None]:
    """A JSON object body, or a multipart form -> (fields, files). Multipart field values are
    strings (a field named `items` is parsed as JSON); files are bytes by part name, None for a
    JSON body."""
    body = await read_body(request, max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body
            yield b""

        n = max_items
        try:
            form = await MultiPartParser(request.headers, stream(), max_files=n, max_fields=n + len(EMBED_FIELDS) + 8,
                                         max_part_size=max_body_bytes).parse()
        except MultiPartException as exc:
            raise HttpError(400, f"bad multipart body: {exc.message}") from None
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            else:
                files[key] = await value.read()
                await value.close()
        await form.close()
        if isinstance(fields.get("items"), str):
            try:
                fields["items"] = loads(fields["items"])
            except json.JSONDecodeError as exc:
                raise HttpError(400, f"the multipart field 'items' is not valid JSON: {exc}", param="items") from None
        for key in ("dimensions", "max_new_tokens"):
            if key in fields:
                try:
                    fields[key] = int(fields[key])
                except ValueError:
                    raise HttpError(400, f"{key} must be an int, got {fields[key]!r}", param=key) from None
        return fields, files
    if ctype not in ("application/json", ""):
        raise HttpError(415, f"content-type {ctype!r} is not supported; send application/json or multipart/form-data")
    try:
        data = loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HttpError(400, f"the body must be a JSON object, got {kind(data)}")
    return data, None


def unknown_fields(fields: dict, known: Sequence[str], what: str) -> None:
    extra = sorted(set(fields) - set(known))
    if extra:
        raise HttpError(400, f"unknown field(s) {extra} in {what}; known: {list(known)}", param=extra[0])


def parse_products(fields: dict, files: dict[str, bytes] | None, max_items: int
                   ) -> tuple[list, dict[int, str], list]:
    """/v1/embed items -> (BatchItem or None per item, {index: error}, ids)."""
    if "items" in fields:
        raw = fields["items"]
        if not isinstance(raw, list):
            raise HttpError(400, f"items must be an array of objects, got {kind(raw)}", param="items")
    elif files is not None:  # multipart shorthand: one product from the fields id, title, trace and the file image
        raw = [{k: fields[k] for k in ("id", "title", "trace") if k in fields}
               | ({"image_file": "image"} if "image" in files else {})]
    else:
        raise HttpError(400, "the request has no 'items' (an array of {id, title, image, trace} objects)",
                        param="items")
    if not raw:
        raise HttpError(400, "items is empty; send at least one product", param="items")
    check_count(len(raw), max_items)
    items: list[BatchItem | None] = []
    errors: dict[int, str] = {}
    ids: list[Any] = []
    for i, it in enumerate(raw):
        ids.append(it.get("id") if isinstance(it, dict) else None)
        try:
            if not isinstance(it, dict):
                raise InvalidInputError(f"item {i}: must be an object with 'title' and/or 'image', got {kind(it)}")
            extra = sorted(set(it) - set(ITEM_FIELDS))
            if extra:
                raise InvalidInputError(f"item {i}: unknown field(s) {extra}; known: {list(ITEM_FIELDS)}")
            rid = it.get("id")
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
                ids[i] = None
                raise InvalidInputError(f"item {i} id: must be a string or an integer, got {kind(rid)}")
            image = None
            if it.get("image") is not None and it.get("image_file") is not None:
                raise InvalidInputError(f"item {i}: give 'image' (base64) or 'image_file' (a multipart part), not both")
            if it.get("image") is not None:
                image = decode_image(it["image"], f"item {i} image")
            elif it.get("image_file") is not None:
                name = it["image_file"]
                if files is None:
                    raise InvalidInputError(f"item {i} image_file: only a multipart request has file parts; "
                                            "in JSON send the photo as base64 in 'image'")
                if not isinstance(name, str) or name not in files:
                    raise InvalidInputError(f"item {i} image_file: no multipart file part named {name!r} "
                                            f"(parts: {sorted(files)[:10]})")
                image = files[name]
                if not image:
                    raise InvalidInputError(f"item {i} image_file: the part {name!r} is empty")
            title = text_field(it.get("title"), f"item {i} title")
            trace = text_field(it.get("trace"), f"item {i} trace")
            if image is None and not (title and title.strip()) and not (trace and trace.strip()):
                raise InvalidInputError(f"item {i}: nothing to embed (no image, "
                                        f"{'title is empty' if title is not None else 'no title'}); "
                                        "give a photo and/or a title")
            items.append(BatchItem(image, title, trace, count_tokens=False))  # /v1/embed reports no usage
        except InvalidInputError as exc:
            errors[i] = str(exc)
            items.append(None)
    return items, errors, ids


def parse_openai_input(value: Any, max_items: int) -> tuple[list, dict[int, str]]:
    """OpenAI `input`: a string or an array of strings (token-id arrays are refused per item)."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise HttpError(400, f"input must be a string or an array of strings, got {kind(value)}", param="input")
    elif value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise HttpError(400, "input is an array of token ids; this server embeds text: send the string(s)",
                        param="input")
    if not value:
        raise HttpError(400, "input is empty; send at least one string", param="input")
    check_count(len(value), max_items)
    items: list[BatchItem | None] = []
    errors: dict[int, str] = {}
    for i, v in enumerate(value):
        if isinstance(v, list):
            errors[i] = f"item {i}: token-id input is not supported by this server; send the text"
        elif not isinstance(v, str):
            errors[i] = f"item {i}: must be a string, got {kind(v)}"
        elif not v.strip():
            errors[i] = f"item {i}: the text is empty{' (whitespace only)' if v else ''}"
        else:
            items.append(BatchItem(text=v))
            continue
        items.append(None)
    return items, errors


def check_count(n: int, max_items: int) -> None:
    if n > max_items:
        raise HttpError(413, f"the request has {n} items; the limit is {max_items} per request "
                             "(--max-items): split it", kind="too_large")
