"""Strings a peer chose, made safe to show in a log or audit line.

Every value a peer chose (Origin-Host, Session-Id, IMEI, Error-Message texts, HTTP paths,
User-Agent...) reaches a log or audit line only through `untrusted()`: control characters
(C0, DEL, C1, the Unicode line and paragraph separators, the bidirectional overrides) are
shown escaped (\x1b, \n, \u202e) and the value is cut at `logging.max_value_chars` with a
marker saying how many characters were cut, so that a peer can neither forge a line nor
colour a terminal, nor make one line long. `shown_message` and `one_event` do the same for
whole messages (eir.core.logs' formatters), keeping the newlines that are ours.

A leaf module (the standard library only), so that the protocol layers (eir.diameter, the
HTTP shells) can use it without importing logging's configuration.
"""

from __future__ import annotations

import re

# Never shown as they are: C0 controls, DEL, C1 controls, the line and paragraph separators,
# and the bidirectional formatting characters (a viewer would reorder the text around them).
_CONTROL_CODES = [*range(0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
                  *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPES = {code: _NAMED.get(code, f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
            for code in _CONTROL_CODES}
# For whole messages: a newline there is ours (a traceback, a list of errors), see _one_event.
ESCAPES_BUT_NEWLINE = {code: text for code, text in _ESCAPES.items() if code != 0x0A}
_CONTROL = re.compile("[" + "".join(f"\\u{code:04x}" for code in _CONTROL_CODES) + "]")
_CONTROL_BUT_NEWLINE = re.compile(
    "[" + "".join(f"\\u{code:04x}" for code in _CONTROL_CODES if code != 0x0A) + "]")
CONTINUATION = "\n  "  # how the text format starts the lines after a message's first

DEFAULT_VALUE_CHARS = 256
_value_chars = DEFAULT_VALUE_CHARS  # logging.max_value_chars: set_value_limit()


def set_value_limit(chars: int) -> None:
    """Cut values at `chars` characters from now on (logging.max_value_chars)."""
    global _value_chars
    _value_chars = chars


def untrusted(value: object, limit: int | None = None) -> str:
    """`value` (str, or bytes read as UTF-8) as a log or audit line may show it: control
    characters escaped, at most `limit` characters (default: logging.max_value_chars) then
    "...[N more chars]". Bytes that are not UTF-8 are shown as \\xNN."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "backslashreplace")
    elif not isinstance(value, str):
        value = str(value)
    return _shown(value, _value_chars if limit is None else limit, _ESCAPES, _CONTROL)


def _shown(text: str, limit: int, escapes: dict[int, str], control: re.Pattern) -> str:
    """`text` with `escapes` applied, cut to at most `limit` characters plus a marker."""
    if len(text) <= limit and control.search(text) is None:
        return text  # the common case: nothing to escape, nothing to cut
    head = text[:limit].translate(escapes)
    kept = min(len(text), limit)
    if len(head) > limit:  # the escapes made it longer: keep whole characters up to limit
        size = kept = 0
        for char in text:
            size += len(escapes.get(ord(char), char))
            if size > limit:
                break
            kept += 1
        head = text[:kept].translate(escapes)
    cut = len(text) - kept
    return f"{head}...[{cut} more chars]" if cut else head


def one_event(text: str) -> str:
    """A formatted text record as one event: control characters escaped, and the lines
    after the first (a traceback, a list of errors) indented, so that none of them can
    pass for a record of its own."""
    if _CONTROL.search(text) is None:
        return text
    return text.translate(ESCAPES_BUT_NEWLINE).replace("\n", CONTINUATION)


def shown_message(message: str, limit: int) -> str:
    """A log message with control characters but newlines escaped, cut at `limit`."""
    return _shown(message, limit, ESCAPES_BUT_NEWLINE, _CONTROL_BUT_NEWLINE)
