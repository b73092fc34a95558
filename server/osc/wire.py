"""OSC 1.0 wire details python-osc leaves to us: strict framing checks and a cheap encoder.

python-osc decodes each message for us, but it zero-pads a truncated trailing float and
skips unknown type tags (with a root-logger warning), which would turn a broken packet
into wrong values, so `message_problem` rejects those first. Bundles are unpacked here
rather than by `OscBundle`, which (python-osc 1.10) loops forever on a negative element
size: one hostile datagram would hang the server. The encoder exists because
building `/prediction` through `OscMessageBuilder` costs several microseconds per
message on the hot path; it only writes the three types every OSC client reads
(`i`, `f`, `s`).
"""

from __future__ import annotations

import math
import struct

_FLOAT = struct.Struct(">f")
_INT = struct.Struct(">i")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1

# Bytes taken by each fixed-size type tag python-osc decodes (T F N [ ] carry no data).
_FIXED_SIZES = {ord(t): n for t, n in zip("ifrmdhtTFN[]", (4, 4, 4, 4, 8, 8, 8, 0, 0, 0, 0, 0))}
_COMMA, _S, _B = ord(","), ord("s"), ord("b")


def _padded(start: int, nul: int) -> int:
    """End of an OSC string that starts at `start` and has its NUL at `nul` (4-byte aligned)."""
    return start + ((nul - start) & ~3) + 4


def message_problem(data: bytes) -> str | None:
    """Why `data` is not a complete OSC message python-osc will read faithfully, or None.

    Trailing bytes after the last argument are tolerated (lenient, like most servers).
    """
    size = len(data)
    nul = data.find(b"\0")
    if nul < 0:
        return "unterminated address"
    pos = _padded(0, nul)
    if pos >= size:  # no type tag string: an argument-less message (OSC 1.0 allows it)
        return None if pos == size else "truncated message"
    if data[pos] != _COMMA:
        return "type tags must start with ','"
    nul = data.find(b"\0", pos)
    if nul < 0:
        return "truncated message"
    tags = data[pos + 1 : nul]
    pos = _padded(pos, nul)
    for tag in tags:
        fixed = _FIXED_SIZES.get(tag)
        if fixed is not None:
            pos += fixed
        elif tag == _S:
            nul = data.find(b"\0", pos)
            if nul < 0:
                return "truncated message"
            pos = _padded(pos, nul)
        elif tag == _B:
            if pos + 4 > size:
                return "truncated message"
            pos += 4 + ((int.from_bytes(data[pos : pos + 4], "big") + 3) & ~3)
        else:
            return f"unsupported OSC type tag {chr(tag)!r}"
    return "truncated message" if pos > size else None


MAX_BUNDLE_DEPTH = 8
_BUNDLE = b"#bundle\0"


def is_bundle(data: bytes) -> bool:
    return data.startswith(_BUNDLE)


def bundle_messages(data: bytes, limit: int | None = None) -> list[bytes]:
    """The message packets inside a bundle (nested ones too), in order; ValueError saying why if malformed.

    The timetag is skipped: callers apply the messages at once. Each returned packet
    still needs `message_problem` and decoding. With a `limit`, unpacking stops once
    `limit` messages are found, and raises `BundleTooLarge` (carrying them) if there is
    more: what lies beyond the limit is neither read nor checked, so a hostile 64 KB
    bundle costs no more than `limit` small messages.
    """
    messages: list[bytes] = []
    cap = -1 if limit is None else limit
    if not _unpack_bundle(data, 1, messages, cap):
        raise BundleTooLarge(messages)
    return messages


class BundleTooLarge(ValueError):
    """A bundle carries more than the limit; `messages` holds the first `limit` of them."""

    def __init__(self, messages: list[bytes]) -> None:
        super().__init__(f"more than {len(messages)} messages")
        self.messages = messages


def _unpack_bundle(data: bytes, depth: int, out: list[bytes], cap: int) -> bool:
    """Append the bundle's messages to `out`; False if `out` reached `cap` (>= 0) with more left."""
    if depth > MAX_BUNDLE_DEPTH:
        raise ValueError(f"bundles nested deeper than {MAX_BUNDLE_DEPTH}")
    size = len(data)
    if size < 16 or not data.startswith(_BUNDLE):
        raise ValueError("truncated bundle")
    pos = 16  # "#bundle\0" and the 8-byte timetag
    while pos < size:
        if len(out) == cap:
            return False
        length = int.from_bytes(data[pos : pos + 4], "big", signed=True)
        pos += 4
        if length <= 0 or length % 4 or pos + length > size:
            raise ValueError("bad bundle element size")
        element = data[pos : pos + length]
        pos += length
        if element.startswith(_BUNDLE):
            if not _unpack_bundle(element, depth + 1, out, cap):
                return False
        elif element.startswith(b"/"):
            out.append(element)
        else:
            raise ValueError("bundle element is neither a message nor a bundle")
    return True


def peek_address(data: bytes, limit: int = 64) -> str:
    """Best-effort address of an unreadable packet, so its `/error` reply says what it was."""
    if not data.startswith((b"/", b"#")):
        return "?"
    nul = data.find(b"\0", 0, limit)
    return data[: nul if nul >= 0 else limit].decode("utf-8", "replace")


def encode_string(text: str) -> bytes:
    """An OSC string: UTF-8, NUL-terminated, padded to 4 bytes (embedded NULs dropped)."""
    raw = text.replace("\0", "").encode("utf-8", "replace")
    return raw + b"\0" * (4 - len(raw) % 4)


def _encode_float(value: float) -> bytes:
    try:
        return _FLOAT.pack(value)
    except OverflowError:  # beyond float32: saturate rather than fail to send
        return _FLOAT.pack(math.copysign(math.inf, value))


def encode_message(address: str, *args: int | float | str) -> bytes:
    """Encode an OSC message with int (`i`), float (`f`, float32) and str (`s`) arguments.

    bool is sent as `i` 0/1 and ints outside int32 as `f`, because Pd and Max read
    neither `T`/`F` nor `h`. Any other type is a programming error (TypeError).
    """
    tags = [","]
    body = []
    for arg in args:
        if isinstance(arg, str):
            tags.append("s")
            body.append(encode_string(arg))
        elif isinstance(arg, int) and _INT_MIN <= arg <= _INT_MAX:
            tags.append("i")
            body.append(_INT.pack(arg))
        elif isinstance(arg, (int, float)):
            tags.append("f")
            body.append(_encode_float(float(arg)))
        else:
            raise TypeError(f"cannot encode {type(arg).__name__} as an OSC argument")
    return encode_string(address) + encode_string("".join(tags)) + b"".join(body)


_PREDICTION = encode_string("/prediction")
# N -> (the struct of N float32s, the head without a voice, the head with one): built once per width.
_PREDICTION_FORMS: dict[int, tuple[struct.Struct, bytes, bytes]] = {}


def _prediction_form(n: int) -> tuple[struct.Struct, bytes, bytes]:
    form = _PREDICTION_FORMS.get(n)
    if form is None:
        tags = "," + "f" * n
        form = _PREDICTION_FORMS[n] = (struct.Struct(">" + "f" * n), _PREDICTION + encode_string(tags),
                                       _PREDICTION + encode_string(tags + "i"))
    return form
NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (Unix)
_TIMETAG = struct.Struct(">Q")
_SIZE = struct.Struct(">i")


def encode_prediction(values: tuple[float, ...], voice: int | None = None) -> bytes:
    """`/prediction v1 .. vN` as float32 (then the voice, with one): sent per model event, so it is cheap."""
    floats, plain, voiced = _prediction_form(len(values))
    head, tail = (plain, b"") if voice is None else (voiced, _INT.pack(voice))
    try:
        return head + floats.pack(*values) + tail
    except OverflowError:
        return head + b"".join(_encode_float(v) for v in values) + tail


def ntp_timetag(unix_seconds: float) -> int:
    """The 64-bit OSC timetag (NTP: seconds since 1900 in the high 32 bits, the fraction in the low 32)."""
    whole = math.floor(unix_seconds)
    fraction = min(int((unix_seconds - whole) * 4294967296.0), 0xFFFFFFFF)
    return ((int(whole) + NTP_EPOCH_OFFSET) & 0xFFFFFFFF) << 32 | fraction


def timetag_seconds(timetag: int) -> float:
    """Unix seconds of a 64-bit OSC timetag (the inverse of `ntp_timetag`, to a few hundred picoseconds)."""
    return (timetag >> 32) - NTP_EPOCH_OFFSET + (timetag & 0xFFFFFFFF) / 4294967296.0


def encode_bundle(timetag: int, *messages: bytes) -> bytes:
    """An OSC bundle of encoded messages, to be acted on at `timetag` (see `ntp_timetag`)."""
    return _BUNDLE + _TIMETAG.pack(timetag) + b"".join(_SIZE.pack(len(m)) + m for m in messages)
