"""What can be wrong with a request body before any field of it is looked at, said the same way everywhere.

Found by posting junk: JSON nested thousands of levels deep overflows the decoder's recursion
(RecursionError), and bytes that are not UTF-8 fail in whichever decoder meets them first
(UnicodeDecodeError). Both used to come out as 500s; they are the client's mistake, a 400.
"""

from __future__ import annotations

TOO_DEEP = "malformed JSON: nested too deeply"


def utf8_problem(body: bytes) -> str | None:
    """None for valid UTF-8; else where it breaks, in the words a client can act on."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return not_utf8(exc)
    return None


def not_utf8(exc: UnicodeDecodeError) -> str:
    return f"request body is not valid UTF-8: {exc.reason} (byte {exc.start})"


def decoding_problem(exc: BaseException) -> str | None:
    """The client-facing message for an exception a decoder raises on junk; None for any other."""
    if isinstance(exc, RecursionError):
        return TOO_DEEP
    if isinstance(exc, UnicodeDecodeError):
        return not_utf8(exc)
    return None
