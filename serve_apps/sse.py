"""Server-sent events: the one encoder of every streamed answer (``/v1/generate`` and the OpenAI routes).

An event is ``event: NAME`` (when named) and one ``data:`` line, then a blank line. A dict is sent as JSON; a string
as it is (OpenAI's closing ``data: [DONE]``, or JSON already encoded, e.g. a pydantic model's).
"""
from __future__ import annotations

import json

DONE = "[DONE]"
"""OpenAI's last event of a stream."""


def sse(data: dict | str, event: str | None = None) -> str:
    """One server-sent event carrying ``data``."""
    body = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"
