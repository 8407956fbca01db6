"""Pure tests of the wire protocol: bytes in, events out."""

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from testnet.base.protocol import (
    EOF, HEADER, NEED_DATA, BadFrame, Connection, LocalProtocolError, ProtocolError,
    RemoteProtocolError, Request, Response, Status, encode_frame,
)

FAST = settings(max_examples=200, deadline=None)


def drain(conn):
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is EOF:
            return out, ev
        out.append(ev)


def test_request_response_round_trip():
    a, b = Connection(), Connection()
    b.receive_data(a.send(Request(7, "store", {"data": b"\x00\xff", "ttl": 10_000})))
    b.receive_data(a.send(Response(8, 421, {"nodes": ["x"]})))
    events, tail = drain(b)
    assert events == [Request(7, "store", {"data": b"\x00\xff", "ttl": 10_000}), Response(8, 421, {"nodes": ["x"]})]
    assert tail is NEED_DATA
    b.receive_data(b"")
    assert b.next_event() is EOF


def test_oversized_announced_length_breaks_stream_without_body():
    conn = Connection(max_frame_size=100)
    conn.receive_data(HEADER.pack(101))  # no body needed to decide
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.status == Status.TOO_LARGE
    with pytest.raises(RemoteProtocolError):  # stays broken
        conn.next_event()


def test_truncated_stream_is_an_error_at_eof():
    conn = Connection()
    frame = conn.send(Request(1, "info", {}))
    conn.receive_data(frame[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize(
    "obj, has_id",
    [
        ([1, 2], False),
        ({"op": "x"}, False),
        ({"id": -1, "op": "x", "args": {}}, False),
        ({"id": True, "op": "x", "args": {}}, False),
        ({"id": 3, "op": "", "args": {}}, True),
        ({"id": 3, "op": "x", "args": [1]}, True),
        ({"id": 3, "op": "x", "args": {}, "extra": 1}, True),
        ({"id": 3}, True),
        ({"id": 3, "status": 9999}, True),
    ],
)
def test_bad_bodies_are_bad_frames_and_stream_continues(obj, has_id):
    conn = Connection()
    body = msgpack.packb(obj, use_bin_type=True)
    conn.receive_data(HEADER.pack(len(body)) + body + conn.send(Request(9, "info", {})))
    events, _ = drain(conn)
    assert isinstance(events[0], BadFrame)
    assert (events[0].id == 3) == has_id
    assert events[1] == Request(9, "info", {})


def test_ext_types_and_invalid_utf8_are_rejected():
    conn = Connection()
    for body in (msgpack.packb({"id": 1, "op": msgpack.ExtType(1, b"x")}), b"\x81\xa2\xff\xfe\x01"):
        conn.receive_data(HEADER.pack(len(body)) + body)
        (ev,), _ = drain(conn)
        assert isinstance(ev, BadFrame)


def test_local_errors():
    conn = Connection(max_frame_size=10)
    with pytest.raises(LocalProtocolError) as info:
        conn.send(Request(1, "store", {"data": b"x" * 100}))
    assert info.value.status == Status.TOO_LARGE
    with pytest.raises(LocalProtocolError):
        Connection().send(Request(1, "x", {"obj": object()}))


@FAST
@given(st.binary(max_size=300), st.booleans())
def test_any_bytes_give_events_or_protocol_error(data, eof):
    conn = Connection(max_frame_size=200)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    try:
        drain(conn)
    except ProtocolError:
        pass


msgs = st.one_of(
    st.builds(Request, st.integers(0, 2**63 - 1), st.text(min_size=1, max_size=10),
              st.dictionaries(st.text(max_size=5), st.one_of(st.integers(-2**63, 2**64 - 1), st.binary(max_size=20), st.text(max_size=5)), max_size=4)),
    st.builds(Response, st.integers(0, 2**63 - 1), st.integers(100, 599), st.one_of(st.none(), st.binary(max_size=30), st.lists(st.integers(0, 5)))),
)


@FAST
@given(st.lists(msgs, max_size=6), st.data())
def test_splitting_the_stream_anywhere_gives_the_same_events(messages, data):
    sender = Connection()
    stream = b"".join(sender.send(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    conn = Connection()
    got = []
    prev = 0
    for cut in cuts + [len(stream)]:
        if cut > prev:  # b"" would mean end of stream
            conn.receive_data(stream[prev:cut])
        got.extend(drain(conn)[0])
        prev = cut
    conn.receive_data(b"")
    rest, tail = drain(conn)
    assert tail is EOF
    assert got + rest == messages


def test_encode_frame_is_length_prefixed():
    frame = encode_frame({"id": 1, "op": "info", "args": {}})
    assert HEADER.unpack(frame[:4])[0] == len(frame) - 4
