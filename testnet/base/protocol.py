"""The swarmnet wire protocol, sans-IO.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
one msgpack map (bytes as msgpack bin, no ext types).  A request is
``{"id": int, "op": str, "args": map}``, a response
``{"id": int, "status": int, "body": any}``.  Many requests may be in flight
on one connection and are answered in any order.

:class:`Connection` never touches a socket or a clock: feed it bytes with
:meth:`Connection.receive_data` (``b""`` means end of stream), pull events
with :meth:`Connection.next_event`, and turn messages into bytes with
:meth:`Connection.send`.  Strategy, after h11: a frame whose *length* is
unacceptable breaks the stream (we cannot find the next frame without reading
an untrusted amount), so it raises :class:`RemoteProtocolError`; a frame of
acceptable length whose *body* is bad is only that frame's problem, so it
comes back as a :class:`BadFrame` event and the stream goes on.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Union

import msgpack

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME_SIZE = 1 << 20  # bytes of body, not counting the 4-byte header
MAX_REQUEST_ID = (1 << 63) - 1
MAX_OP_LENGTH = 64


class Status(enum.IntEnum):
    """Response status codes, as HTTP where they fit."""

    OK = 200
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    CLOCK_OUT_OF_RANGE = 406
    TOO_LARGE = 413
    WRONG_SWARM = 421
    RATE_LIMITED = 429
    INTERNAL_ERROR = 500
    BAD_GATEWAY = 502
    NOT_READY = 503
    GATEWAY_TIMEOUT = 504
    INSUFFICIENT_STORAGE = 507  # the node's disk is full: nothing of the write was kept


class ProtocolError(Exception):
    """The protocol was broken; ``status`` is the code to answer with."""

    def __init__(self, message: str, status: int = Status.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


class RemoteProtocolError(ProtocolError):
    """The peer broke the rules badly enough that the stream cannot go on."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A well-delimited frame whose body was not a valid message.

    ``id`` is the request id when one could be read (so the error can be
    answered to the right caller), else ``None``.
    """

    id: int | None
    status: int
    reason: str


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    EOF = "EOF"


NEED_DATA = _Sentinel.NEED_DATA
EOF = _Sentinel.EOF

Event = Union[Request, Response, BadFrame, _Sentinel]
Message = Union[Request, Response]


def _ext_hook(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def decode_body(body: bytes) -> Request | Response | BadFrame:
    """Decode one frame body into a message, or a :class:`BadFrame`."""
    try:
        obj = msgpack.unpackb(body, raw=False, ext_hook=_ext_hook, strict_map_key=True)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        return BadFrame(None, Status.BAD_REQUEST, f"frame body is not valid msgpack: {type(exc).__name__}")
    if not isinstance(obj, dict):
        return BadFrame(None, Status.BAD_REQUEST, "frame body must be a msgpack map")
    msg_id = obj.get("id")
    if not isinstance(msg_id, int) or isinstance(msg_id, bool) or not 0 <= msg_id <= MAX_REQUEST_ID:
        return BadFrame(None, Status.BAD_REQUEST, "'id' must be an integer in [0, 2^63)")
    if "op" in obj:
        op, args = obj["op"], obj.get("args", {})
        if set(obj) - {"id", "op", "args"}:
            return BadFrame(msg_id, Status.BAD_REQUEST, "unexpected keys in request")
        if not isinstance(op, str) or not 0 < len(op) <= MAX_OP_LENGTH:
            return BadFrame(msg_id, Status.BAD_REQUEST, "'op' must be a non-empty string")
        if not isinstance(args, dict):
            return BadFrame(msg_id, Status.BAD_REQUEST, "'args' must be a map")
        return Request(msg_id, op, args)
    if "status" in obj:
        status = obj["status"]
        if set(obj) - {"id", "status", "body"}:
            return BadFrame(msg_id, Status.BAD_REQUEST, "unexpected keys in response")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            return BadFrame(msg_id, Status.BAD_REQUEST, "'status' must be an integer in [100, 600)")
        return Response(msg_id, status, obj.get("body"))
    return BadFrame(msg_id, Status.BAD_REQUEST, "frame is neither a request nor a response")


def encode_frame(obj: dict[str, Any], max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """One msgpack map as a length-prefixed frame."""
    try:
        body = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode message: {exc}") from None
    if len(body) > max_frame_size:
        raise LocalProtocolError(
            f"frame of {len(body)} bytes exceeds the maximum of {max_frame_size}", Status.TOO_LARGE
        )
    return HEADER.pack(len(body)) + body


def encode_message(msg: Message, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    if isinstance(msg, Request):
        return encode_frame({"id": msg.id, "op": msg.op, "args": msg.args}, max_frame_size)
    if isinstance(msg, Response):
        return encode_frame({"id": msg.id, "status": int(msg.status), "body": msg.body}, max_frame_size)
    raise LocalProtocolError(f"cannot send {type(msg).__name__}")


class FrameSplitter:
    """Cuts a byte stream into frame bodies; knows nothing of msgpack."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._eof = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            if data:
                raise RemoteProtocolError("data received after end of stream")
            return
        if not data:
            self._eof = True
        else:
            self._buf += data

    def next_body(self) -> bytes | _Sentinel:
        """The next complete frame body, ``NEED_DATA`` or ``EOF``."""
        if len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame_size:
                # Never read the body: its announced length is untrusted.
                raise RemoteProtocolError(
                    f"announced frame of {length} bytes exceeds the maximum of {self.max_frame_size}",
                    Status.TOO_LARGE,
                )
            end = HEADER.size + length
            if len(self._buf) >= end:
                body = bytes(self._buf[HEADER.size:end])
                del self._buf[:end]
                return body
        if self._eof:
            if self._buf:
                raise RemoteProtocolError(f"stream ended inside a frame ({len(self._buf)} bytes left)")
            return EOF
        return NEED_DATA


class Connection:
    """One end of a swarmnet connection, without I/O.

    >>> a, b = Connection(), Connection()
    >>> b.receive_data(a.send(Request(1, "info", {})))
    >>> b.next_event()
    Request(id=1, op='info', args={})
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._splitter = FrameSplitter(max_frame_size)
        self._broken: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet cut into frames: a frame under way when > 0."""
        return self._splitter.buffered

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        self._splitter.receive_data(data)

    def next_event(self) -> Event:
        """The next event: a message, a :class:`BadFrame`, ``NEED_DATA`` or ``EOF``.

        Raises :class:`RemoteProtocolError` when the stream itself is broken;
        after that every call raises the same error.
        """
        if self._broken is not None:
            raise self._broken
        try:
            body = self._splitter.next_body()
        except RemoteProtocolError as exc:
            self._broken = exc
            raise
        if isinstance(body, _Sentinel):
            return body
        return decode_body(body)

    def events(self) -> list[Request | Response | BadFrame]:
        """Every complete event buffered now (stops at ``NEED_DATA``/``EOF``)."""
        out: list[Request | Response | BadFrame] = []
        while True:
            ev = self.next_event()
            if isinstance(ev, _Sentinel):
                return out
            out.append(ev)

    def send(self, msg: Message) -> bytes:
        """The bytes that carry ``msg`` to the peer."""
        if isinstance(msg, Request):
            if not 0 <= msg.id <= MAX_REQUEST_ID or not 0 < len(msg.op) <= MAX_OP_LENGTH:
                raise LocalProtocolError("request id or op out of range")
        return encode_message(msg, self.max_frame_size)


def error_frame(status: int, reason: str, msg_id: int = 0) -> bytes:
    """A response frame for a request that could not be read (id 0 when unknown)."""
    return encode_message(Response(msg_id, status, {"error": reason}))


class RequestError(Exception):
    """Raised by request handlers to answer with a non-200 status.

    ``body`` defaults to ``{"error": message}``; a 421 carries the right
    swarm's members instead.
    """

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.body = {"error": message} if body is None else body
