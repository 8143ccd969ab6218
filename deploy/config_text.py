"""Text that ``deploy init`` writes into config files: TOML strings and the paths it accepts.

Node configs and the flwr connection are TOML that Flower parses at each site; a value that
does not survive that (a non-UTF-8 path, a control character) must be refused with its option
name here, not found out as a parse error at the site.
"""

from __future__ import annotations

import json
import re
import unicodedata


class DeployInitError(ValueError):
    """Bad arguments or a file that would be overwritten; the message names it."""


def toml_str(value: str) -> str:
    """A TOML basic string. JSON escapes quotes, backslashes and U+0000-U+001F the way TOML does;
    TOML also forbids a raw DEL (U+007F), which JSON leaves as is, so that is escaped too."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007F")


def _control_character(value: str) -> str | None:
    """The first control character in ``value`` as ``U+XXXX at position N``, or None."""
    for index, char in enumerate(value):
        if unicodedata.category(char) == "Cc":
            return f"U+{ord(char):04X} at position {index}"
    return None


def check_path_option(option: str, value: str, template: bool = True) -> None:
    """A path that goes into a config file: UTF-8, no control character, only ``{site}`` in braces."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DeployInitError(f"{option} {value!r} is not valid UTF-8 (config files are UTF-8 text); "
                              "rename the folder or give another path") from None
    bad = _control_character(value)
    if bad:
        raise DeployInitError(f"{option} {value!r} contains a control character ({bad}); "
                              "a path with one is almost certainly a typing or paste error")
    if template and re.search(r"[{}]", value.replace("{site}", "")):
        raise DeployInitError(f"{option} {value!r}: only '{{site}}' may appear in braces")
