"""JSON-RPC 2.0 framing and validation for the MCP gateway.

Every message that crosses the gateway is decoded here into a `Message`
struct and classified; anything that does not decode or classify becomes a
`WireError` carrying the JSON-RPC error to answer with. Payload members the
gateway never decides on (`params` of most methods, `result`, error `data`)
stay `msgspec.Raw`: validated as JSON, forwarded byte for byte, never turned
into Python objects.

Forwarded messages are always re-encoded from the decoded struct, so the peer
parses exactly what the gateway decided on: a duplicated `"method"` key, for
one, reaches the server only in the form the gateway read it.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec
from msgspec import UNSET, UnsetType

# Standard JSON-RPC codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
# MCP (protocol 2026-07-28): HTTP routing headers disagree with the body.
HEADER_MISMATCH = -32020
# leash's own codes, in JSON-RPC's implementation-defined band (-32000..-32019;
# the MCP SDKs use -32000 and -32001 internally).
POLICY_REFUSED = -32010
UPSTREAM_FAILED = -32011
UPSTREAM_TIMEOUT = -32012
CONNECTION_REFUSED = -32013      # the daemon refused a connection (not an agent, unknown server)

RequestId = Union[int, str]


class ErrorObject(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Union[msgspec.Raw, UnsetType] = UNSET


class Message(msgspec.Struct, omit_defaults=True):
    """One JSON-RPC message, any kind. `classify` says which kind it is."""
    jsonrpc: str
    id: Union[RequestId, None, UnsetType] = UNSET
    method: Union[str, UnsetType] = UNSET
    params: Union[dict[str, msgspec.Raw], list[msgspec.Raw], UnsetType] = UNSET
    result: Union[dict[str, msgspec.Raw], UnsetType] = UNSET
    error: Union[ErrorObject, UnsetType] = UNSET


REQUEST, NOTIFICATION, RESULT, ERROR = "request", "notification", "result", "error"


class WireError(Exception):
    """A message that cannot be accepted. `id` is the request id when it could
    be recovered (so the sender is not left waiting), otherwise None."""

    def __init__(self, code: int, message: str, id: RequestId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


class Frame(msgspec.Struct):
    """What one transport unit (a stdio line, an HTTP body, an SSE event)
    carried: one message, or a batch. Elements that failed validation are
    kept as WireErrors, in order, so each gets its own answer."""
    items: list[Union[Message, WireError]]
    batch: bool


_frame_decoder = msgspec.json.Decoder(Union[Message, list[msgspec.Raw]])
_message_decoder = msgspec.json.Decoder(Message)
_object_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()


def parse(data: bytes) -> Frame:
    """Decode one frame. Raises WireError when the frame as a whole is unusable
    (not JSON, neither an object nor an array, an empty batch)."""
    try:
        top = _frame_decoder.decode(data)
    except msgspec.ValidationError as e:
        raise WireError(INVALID_REQUEST, f"invalid JSON-RPC message: {_short(e)}", _id_of(data)) from None
    except msgspec.DecodeError as e:
        raise WireError(PARSE_ERROR, f"parse error: {_short(e)}", salvage_id(data)) from None
    if isinstance(top, Message):
        classify(top)
        return Frame([top], batch=False)
    if not top:
        raise WireError(INVALID_REQUEST, "empty batch")
    items: list[Message | WireError] = []
    for element in top:
        try:
            msg = _message_decoder.decode(element)
            classify(msg)
            items.append(msg)
        except msgspec.ValidationError as e:
            items.append(WireError(INVALID_REQUEST, f"invalid JSON-RPC message: {_short(e)}", _id_of(element)))
        except WireError as e:
            items.append(e)
    return Frame(items, batch=True)


def classify(msg: Message) -> str:
    """The message's kind. Raises WireError for anything JSON-RPC 2.0 (with
    MCP's rule that ids are strings or integers) does not allow."""
    rid = None if msg.id is UNSET else msg.id
    if msg.jsonrpc != "2.0":
        raise WireError(INVALID_REQUEST, 'invalid JSON-RPC message: "jsonrpc" must be "2.0"', rid)
    if msg.method is not UNSET:
        if msg.result is not UNSET or msg.error is not UNSET:
            raise WireError(INVALID_REQUEST, "invalid JSON-RPC message: a request carries no result or error", rid)
        if msg.id is UNSET:
            return NOTIFICATION
        if msg.id is None:
            raise WireError(INVALID_REQUEST, "invalid JSON-RPC message: a request id must be a string or integer")
        return REQUEST
    if msg.params is not UNSET:
        raise WireError(INVALID_REQUEST, 'invalid JSON-RPC message: params without "method"', rid)
    if (msg.result is UNSET) == (msg.error is UNSET):
        raise WireError(INVALID_REQUEST, "invalid JSON-RPC message: a response carries exactly one of result and error", rid)
    if msg.id is UNSET:
        raise WireError(INVALID_REQUEST, 'invalid JSON-RPC message: a response carries an "id"')
    if msg.result is not UNSET:
        if msg.id is None:
            raise WireError(INVALID_REQUEST, "invalid JSON-RPC message: a result needs the request's id")
        return RESULT
    return ERROR


def _id_of(data: bytes) -> RequestId | None:
    """The id member of a JSON object that failed validation, if it is usable."""
    try:
        raw_id = _object_decoder.decode(data).get("id")
        value = None if raw_id is None else msgspec.json.decode(raw_id)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------- building messages

def error_reply(id: RequestId | None, code: int, message: str, data: object = None) -> Message:
    err = ErrorObject(code, message)
    if data is not None:
        err.data = msgspec.Raw(_encoder.encode(data))
    return Message("2.0", id=id, error=err)


def notification(method: str, params: dict[str, object]) -> Message:
    return Message("2.0", method=method, params={k: msgspec.Raw(_encoder.encode(v)) for k, v in params.items()})


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def encode_frame(messages: list[Message], batch: bool) -> bytes | None:
    """A frame for the given messages: a batch stays a batch (JSON-RPC answers
    a batch with an array); None when nothing is left to send."""
    if not messages:
        return None
    if batch:
        return _encoder.encode(messages)
    (only,) = messages
    return _encoder.encode(only)


def raw(value: object) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(value))


def decode_raw(value: msgspec.Raw, type_: Any) -> Any:
    """Decode a Raw member into `type_`; msgspec.ValidationError/DecodeError on mismatch."""
    return msgspec.json.decode(value, type=type_)


# ---------------------------------------------------------------- ids of unreadable messages

def salvage_id(prefix: bytes) -> RequestId | None:
    """The top-level "id" of a JSON object whose full text is unusable
    (truncated, oversized, malformed later on), scanning only `prefix`, so the
    error can name the request the sender is waiting on. None when the id does
    not appear before the text stops making sense."""
    i, n, depth = 0, len(prefix), 0
    expect_key = False
    while i < n:
        c = prefix[i]
        if c == 0x22:  # '"'
            end = _string_end(prefix, i)
            if end < 0:
                return None
            if depth == 1 and expect_key and prefix[i:end + 1] == b'"id"':
                j = _skip_ws(prefix, end + 1)
                if j < n and prefix[j] == 0x3A:  # ':'
                    return _scalar_id(prefix, _skip_ws(prefix, j + 1))
            expect_key = False
            i = end + 1
            continue
        if c in b"{[":
            depth += 1
            expect_key = c == 0x7B
        elif c in b"}]":
            depth -= 1
            if depth <= 0:
                return None
        elif c == 0x2C:  # ','
            expect_key = True
        i += 1
    return None


def _string_end(buf: bytes, start: int) -> int:
    i = start + 1
    while i < len(buf):
        if buf[i] == 0x5C:  # backslash
            i += 2
            continue
        if buf[i] == 0x22:
            return i
        i += 1
    return -1


def _skip_ws(buf: bytes, i: int) -> int:
    while i < len(buf) and buf[i] in b" \t\r\n":
        i += 1
    return i


def _scalar_id(buf: bytes, i: int) -> RequestId | None:
    if i >= len(buf):
        return None
    if buf[i] == 0x22:
        end = _string_end(buf, i)
        if end < 0:
            return None
        token = buf[i:end + 1]
    else:
        j = i
        while j < len(buf) and buf[j] in b"-0123456789":
            j += 1
        if j == len(buf) or buf[j] not in b" \t\r\n,}":
            return None
        token = buf[i:j]
    try:
        value = msgspec.json.decode(token)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None
