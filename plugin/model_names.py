"""Which names can be models at all: the sidecar gates, counts and reports only those.

A model name is the client's to choose. Triton looks a name up and answers NOT_FOUND for one it
does not serve, but it reads names as C strings (a name with a NUL is served as the model named
by its first part), and a name that no repository could hold can never be gated. The sidecar relays
requests for such names to Triton untouched (the client gets Triton's own answer) and never keeps,
reports or labels anything by them, so a client cannot grow its tables or forge its reports.
native/smdp_gate.cc (``PlausibleModelName``) applies the same rule.
"""

from __future__ import annotations

MAX_MODEL_NAME_BYTES = 1024
"""Longer than any name a model repository can hold (a directory name is at most 255 bytes, an
object-store key at most 1024)."""


def is_model_name(name: str) -> bool:
    """1 to ``MAX_MODEL_NAME_BYTES`` bytes of UTF-8, no control characters (C0 or DEL)."""
    if not name or len(name) > MAX_MODEL_NAME_BYTES or len(name.encode("utf-8", "surrogatepass")) > MAX_MODEL_NAME_BYTES:
        return False
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
