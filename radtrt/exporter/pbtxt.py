"""Protobuf text format, the language of Triton's ``config.pbtxt``: a writer for config dicts and a parser for
what it writes (and Triton's own configs), so a written repository can be read back and its wiring checked."""

from __future__ import annotations

import json
import re
from typing import Any

from radtrt.errors import fail


class Ident(str):
    """A bare protobuf-text identifier (an enum value such as TYPE_FP16), written without quotes."""


def _scalar(v: Any) -> str:
    if isinstance(v, Ident):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    # raw UTF-8, not \u escapes: protobuf's text format refuses JSON's surrogate pairs (an emoji in a path)
    return json.dumps(str(v), ensure_ascii=False)


def to_pbtxt(msg: dict[str, Any], indent: int = 0) -> str:
    pad = "  " * indent
    lines = []
    for key, value in msg.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value) and value:
            items = ",\n".join(f"{pad}  {{\n{to_pbtxt(v, indent + 2)}{pad}  }}" for v in value)
            lines.append(f"{pad}{key} [\n{items}\n{pad}]")
        elif isinstance(value, list):  # scalar lists need the colon in protobuf text
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?|("(?:[^"\\]|\\.)*")|([\[\]{}:,])|([A-Za-z_][A-Za-z0-9_.]*)|'
                    r'(-?[0-9][0-9.eE+-]*))')


def _tokens(text: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip():
                fail(f"cannot parse protobuf text near: {text[pos:pos + 30]!r}")
            break
        pos = m.end()
        if m.group(1):
            out.append(("value", json.loads(m.group(1))))
        elif m.group(2):
            out.append(("punct", m.group(2)))
        elif m.group(3):
            word = m.group(3)
            out.append(("value", {"true": True, "false": False}.get(word, Ident(word))))
        elif m.group(4):
            num = m.group(4)
            out.append(("value", float(num) if any(c in num for c in ".eE") else int(num)))
    return out


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Protobuf text -> dicts; a field written several times or with ``[...]`` becomes a list."""
    tokens = _tokens(text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        kind, tok = tokens[pos]
        pos += 1
        if (kind, tok) == ("punct", "{"):
            return message("}")
        if kind != "value":
            fail(f"unexpected {tok!r} in protobuf text")
        return tok

    def message(end: str | None) -> dict[str, Any]:
        nonlocal pos
        msg: dict[str, Any] = {}
        repeated: set[str] = set()
        while pos < len(tokens) and tokens[pos] != ("punct", end):
            name = str(tokens[pos][1])
            pos += 1
            if tokens[pos] == ("punct", ":"):
                pos += 1
            if tokens[pos] == ("punct", "["):
                pos += 1
                items = []
                while tokens[pos] != ("punct", "]"):
                    items.append(value())
                    if tokens[pos] == ("punct", ","):
                        pos += 1
                pos += 1
                msg[name] = (msg[name] + items) if name in repeated else items
                repeated.add(name)
                continue
            item = value()
            if name in msg:
                if name not in repeated:
                    msg[name] = [msg[name]]
                    repeated.add(name)
                msg[name].append(item)
            else:
                msg[name] = item
        pos += 1
        return msg

    return message(None)


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]
