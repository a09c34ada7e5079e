"""One-line errors for what operators and peers write: TOML files and pydantic documents.

Their text ends up in the messages (a quoted TOML key, an address that does not parse), so
line breaks and other unprintable characters in it are escaped.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (\\n, \\u2028)."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode()
                   for char in text)


def read_toml(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The document in `path`, or `error` with one line that names the file."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:  # bad TOML, bytes that are not UTF-8, a number too long
        raise error(f"{path}: not valid TOML: {one_line(str(exc))}") from None
    except RecursionError:
        raise error(f"{path}: not valid TOML: nested too deeply") from None


def first_validation_error(exc: ValidationError) -> str:
    """'field.path: what is wrong (and N more)' for the first error pydantic found."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return one_line(f"{where}: {message}{more}")
