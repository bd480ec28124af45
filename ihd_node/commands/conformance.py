"""`ihd-node conformance [--config FILE] [--out FILE.md|FILE.html]`: write the DICOM Conformance Statement."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ihd_node.config import Config, load_config
from ihd_node.errors import UserError

FORMATS = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}


def conformance_command(args: Any) -> int:
    """Markdown on stdout without --out; otherwise the format named by the file's suffix."""
    from ihd_node.conformance import write_statement

    fmt = "md"
    if args.out:
        fmt = FORMATS.get(Path(args.out).suffix.lower(), "")
        if not fmt:
            raise UserError(f"--out {args.out}: unknown format; name the file .md (Markdown) or .html")
    # No config: the defaults, as a fresh installation would run (nothing on disk is checked).
    config = load_config(args.config) if args.config else Config.model_validate({}, context={"check_files": False})
    text = write_statement(config, fmt)
    if not args.out:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write ({exc.strerror}); choose a writable path") from None
    print(f"wrote {out} ({'HTML' if fmt == 'html' else 'Markdown'}, {len(text.splitlines())} lines)")
    return 0
