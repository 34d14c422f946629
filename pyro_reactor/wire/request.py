"""A parsed request and typed, validated access to its fields.

The reference agent coerces every field with ``str()``/``int()``/``bool()``; an unmodified host
only ever sends the right JSON types, so we accept those (plus the harmless coercions the
reference allows, such as ``"30"`` for an integer) and answer a clear error for anything else
instead of guessing.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyro_reactor.errors import ActionError

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

_MISSING: Any = object()

_MAX_DIGITS = sys.get_int_max_str_digits() or 4300

INTEGER_LIMIT = 2**63 - 1
"""The largest magnitude an integer field may have (a C ``long``); beyond it, a clear error."""


def checkText(name: str, text: str, *, codecMessage: bool = False) -> str:
    """``text``, unless it holds a lone surrogate (``"\\ud800"`` in the JSON).

    Such a string cannot be encoded as UTF-8, so it could reach neither a file, a path, a
    terminal nor a child's arguments: refused here, before anything starts, with a message
    naming the field (never the value). ``codecMessage`` answers the codec's own message
    instead (it names the character and its position), as the reference answers it for
    ``write_workspace_file``'s text.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            if codecMessage:
                raise ActionError(str(error)) from None
            raise ActionError(f"{name} must be valid Unicode text") from None
    return text


def parseRequestLine(line: bytes | bytearray) -> Request:
    """Turn one request line (without its newline) into a L{Request}."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ActionError("request is not valid UTF-8") from None
    text = text.strip()
    if not text:
        raise ActionError("request is empty: expected one JSON object on one line")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ActionError(f"request is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        # `[[[[...` a hundred thousand deep fits in a request line and exhausts the parser.
        raise ActionError("request is not valid JSON: nested too deeply") from None
    except ValueError:
        # Python refuses to turn more than 4300 digits into an int (CVE-2020-10735): a plain
        # ValueError, not a JSONDecodeError.
        raise ActionError(
            f"request is not valid JSON: a number has more than {_MAX_DIGITS} digits"
        ) from None
    if not isinstance(payload, dict):
        raise ActionError("request must be a JSON object")
    return Request(payload)


def checkedName(text: str, pattern: re.Pattern[str], what: str) -> str:
    """C{text} without surrounding blanks, checked as the reference checks a name: an error
    "C{what} is required" when nothing is left, "C{what} is invalid" unless C{pattern}
    matches all of it."""
    name = text.strip()
    if name == "":
        raise ActionError(f"{what} is required")
    if pattern.fullmatch(name) is None:
        raise ActionError(f"{what} is invalid")
    return name


def normalizeEnvName(name: str) -> str:
    """Check an environment variable (or secret) name as the reference does."""
    return checkedName(name, ENV_NAME_RE, "secret name")


@dataclass
class Request:
    """One request: its JSON fields, and the spooled upload body for archive actions.

    ``upload`` is the path of a file holding exactly ``archive_size`` bytes that followed the
    request line; the protocol removes it once the answer has been written.
    """

    fields: dict[str, Any]
    upload: Path | None = field(default=None)

    @property
    def action(self) -> str:
        return self.string("action", "exec")

    def has(self, name: str) -> bool:
        return self.fields.get(name) is not None

    def _get(self, name: str, default: Any) -> Any:
        value = self.fields.get(name)
        return default if value is None else value

    def string(self, name: str, default: str = "", *, codecMessage: bool = False) -> str:
        """A string field; numbers are accepted and turned to text as the reference does.

        A lone surrogate is refused (see L{checkText}, which ``codecMessage`` is passed to).
        """
        value = self._get(name, default)
        if isinstance(value, str):
            return checkText(name, value, codecMessage=codecMessage)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ActionError(f"{name} must be a string")
        return str(value)

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        """An integer field; an integral float or a numeric string is accepted.

        Its magnitude is at most L{INTEGER_LIMIT} (``10**400`` seconds is no timeout at all),
        and within ``minimum``/``maximum`` when given: a clear error, before anything starts.
        """
        number = self._integer(name, self._get(name, default))
        if abs(number) > INTEGER_LIMIT:
            raise ActionError(f"{name} is out of range (at most {INTEGER_LIMIT} in magnitude)")
        if minimum is not None and number < minimum:
            raise ActionError(f"{name} must be at least {minimum}")
        if maximum is not None and number > maximum:
            raise ActionError(f"{name} must be at most {maximum}")
        return number

    @staticmethod
    def _integer(name: str, value: Any) -> int:
        if isinstance(value, bool):
            raise ActionError(f"{name} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and len(value) <= 64:
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ActionError(f"{name} must be an integer")

    def optionalInteger(self, name: str) -> int | None:
        return self.integer(name, 0) if self.has(name) else None

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ActionError(f"{name} must be a boolean")
        return value

    def mapping(self, name: str, message: str | None = None) -> dict[str, Any] | None:
        """An optional JSON object field (``None`` when absent or null)."""
        value = self.fields.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ActionError(message or f"{name} must be a JSON object")
        return value

    def stringList(self, name: str, message: str | None = None) -> list[str] | None:
        value = self.fields.get(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise ActionError(message or f"{name} must be a list")
        return [checkText(name, item) if isinstance(item, str) else str(item) for item in value]

    def environment(self, label: str) -> dict[str, str] | None:
        """The ``env`` overrides of an exec/shell/service request, names checked.

        ``label`` names the action family in the reference's message, e.g.
        ``"exec env must be a JSON object"``.
        """
        payload = self.mapping("env", f"{label} env must be a JSON object")
        if payload is None:
            return None
        result: dict[str, str] = {}
        for key, value in payload.items():
            text = value if isinstance(value, str) else str(value)
            if "\x00" in text or "\x00" in key:
                raise ActionError(f"{label} env values must not contain NUL bytes")
            try:
                # A lone surrogate ("\ud800" in the JSON) cannot reach a child's environment;
                # refused here, it never becomes a crash whose exception holds the value.
                os.fsencode(text)
            except UnicodeEncodeError:
                raise ActionError(f"{label} env values must be valid Unicode text") from None
            result[normalizeEnvName(checkText(f"{label} env names", key))] = text
        return result
