"""Every peer message survives its wire encoding: requests through the client-side RESP parser
the peer port uses, replies through hiredis as the dialling node reads them."""

from __future__ import annotations

import hiredis
import pytest

from respreg.core.types import (
    NO_BALLOT,
    Accept,
    Accepted,
    Ballot,
    Learn,
    Nack,
    Prepare,
    Promise,
    Proposal,
    Propose,
    Read,
    Refused,
    Reply,
    Request,
    State,
    Voted,
    Written,
)
from respreg.peer import decode_reply, decode_request, encode_reply, encode_request
from respreg.resp import RequestParser

B = Ballot(7, 2, 123456789012)
P = Proposal(b"\x00pid\r\n", b"value \r\n with CRLF")

REQUESTS: list[tuple[int, Request]] = [
    (5, Prepare(b"k", B)),
    (6, Accept(b"k", Ballot(0, 1, 0), P)),
    (7, Read(b"")),
    (0, Learn(b"k", P)),
    (8, Propose(b"k", P, 3000)),
    (9, Accept(b"k", Ballot(0, 1, 0), P, notify=3)),
    (0, Voted(b"k", Ballot(0, 2, 123456789012), P.pid)),
]
REPLIES: list[Reply] = [
    Promise(B, NO_BALLOT, None, False),
    Promise(B, Ballot(0, 1, 5), P, True),
    Accepted(B),
    Nack(B, Ballot(9, 3, 1)),
    State(NO_BALLOT, None, False),
    State(B, P, True),
    Refused("disk said no"),
    Written("CHOSEN", P, ""),
    Written("NOQUORUM", None, "2 of 3 nodes unreachable"),
    Written("UNCERTAIN", None, "owner did not answer"),
]


@pytest.mark.parametrize(("req_id", "msg"), REQUESTS)
def test_request_round_trip(req_id: int, msg: Request) -> None:
    parser = RequestParser()
    parser.feed(encode_request(req_id, msg))
    args = parser.next()
    assert args is not None and args[0] == b"PX"
    assert decode_request(args[1:]) == (req_id, msg)


@pytest.mark.parametrize("reply", REPLIES)
def test_reply_round_trip(reply: Reply) -> None:
    reader = hiredis.Reader()
    reader.feed(encode_reply(42, reply))
    assert decode_reply(reader.gets()) == (42, reply)


@pytest.mark.parametrize(
    "args",
    [
        [b"8", b"W", b"k", b"pid", b"v"],  # no deadline
        [b"8", b"W", b"k", b"pid", b"v", b"0"],  # deadline must be positive
        [b"8", b"W", b"k", b"pid", b"v", b"99999999999"],  # beyond an hour
        [b"8", b"W", b"k", b"pid", b"v", b"soon"],
    ],
)
def test_malformed_forward_is_rejected(args: list[bytes]) -> None:
    with pytest.raises(ValueError):
        decode_request(args)


@pytest.mark.parametrize(
    "args",
    [
        [b"9", b"A", b"k", b"0", b"1", b"0", b"pid", b"v", b"0"],  # a node to notify is never 0
        [b"9", b"A", b"k", b"0", b"1", b"0", b"pid", b"v", b"-3"],
        [b"9", b"A", b"k", b"0", b"1", b"0", b"pid", b"v", b"3", b"x"],  # one field too many
        [b"9", b"V", b"k", b"0", b"2", b"0", b"pid"],  # a vote has request id 0
        [b"0", b"V", b"k", b"0", b"2", b"0"],  # no proposal id
    ],
)
def test_malformed_accept_or_vote_is_rejected(args: list[bytes]) -> None:
    with pytest.raises(ValueError):
        decode_request(args)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"9223372036854775807", 2**63 - 1),
        (b"-9223372036854775808", -(2**63)),
        (b"999999999999999999", 10**18 - 1),
        (b"-99999999999999999", -(10**17) + 1),
        (b"9223372036854775808", None),
        (b"-9223372036854775809", None),
        (b"00000000000000000009223372036854775808", None),
        (b"1" * 40, None),
    ],
)
def test_ballot_numbers_must_fit_64_bits(text: bytes, value: int | None) -> None:
    # What the state files can hold: a number past it is malformed, however it is written.
    args = [b"5", b"P", b"k", b"1", b"2", text]
    if value is None:
        with pytest.raises(ValueError):
            decode_request(args)
    else:
        assert decode_request(args) == (5, Prepare(b"k", Ballot(1, 2, value)))
        assert type(decode_request(args)[1].ballot) is Ballot  # type: ignore[union-attr]
