"""Character sets PS3.3 C.12.1.1.2 defines that pydicom 3.0 mishandles, fixed once at import.

- Latin alphabet No. 9 (ISO_IR 203, ISO 2022 IR 203) is missing from pydicom's tables: it decodes such
  text as the default repertoire (mojibake) and cannot write it. Registering the Python codec and its G1
  escape sequence (ESC 2/13 6/2, "ESC - b", PS3.3 Table C.12-3) makes it work like any single-byte set.
- GB 2312 with code extensions (ISO 2022 IR 58) is passed to Python's GB 2312 codec escape sequence and
  all, which that codec does not understand: names read as "$)A张" and are written without the escape
  sequence. ISO-IR 58 is a G1 set like Korean ISO-IR 149, so it is handled the same way: pydicom strips
  the escape sequence when decoding and writes it before the GB 2312 bytes when encoding.
"""

from __future__ import annotations

from pydicom import charset

LATIN_9 = "iso8859_15"
LATIN_9_ESCAPE = charset.ESC + b"-b"


def register() -> None:
    """Idempotent: adds only what is missing."""
    charset.python_encoding.setdefault("ISO_IR 203", LATIN_9)
    charset.python_encoding.setdefault("ISO 2022 IR 203", LATIN_9)
    charset.CODES_TO_ENCODINGS.setdefault(LATIN_9_ESCAPE, LATIN_9)
    charset.ENCODINGS_TO_CODES.setdefault(LATIN_9, LATIN_9_ESCAPE)
    charset.handled_encodings = tuple(e for e in charset.handled_encodings if e != "iso_ir_58")


register()
