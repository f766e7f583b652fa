"""The start-up warning about Triton's own dynamic batcher behind the merged gate.

Seen with Triton 2.51: its batcher, idle between the gate's merged requests, now and then misses the
enqueue and holds a request for its 500 ms default wait. The gate already forms the batches, so
``triton_batcher: off`` (the sidecar reloads such models without ``dynamic_batching``) removes the
cause. The warning is said once per start, one line for all the models seen within ``gather_s`` of
the first (at start they are read together), and not at all when the operator set ``triton_batcher``
(``keep`` is then a choice, not an oversight). A model first seen after that line gets an INFO line.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("smdp.sidecar")


class TritonBatcherNotice:
    """Gathers the gated models that keep Triton's batcher and says so once."""

    GATHER_S = 2.0

    def __init__(self, chosen: bool, gather_s: float = GATHER_S) -> None:
        self._chosen = chosen
        self._gather_s = gather_s
        self._seen: set[str] = set()
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._said = False

    def seen(self, model: str) -> None:
        """A gated model (merged mode) whose config has ``dynamic_batching``; called on its event loop."""
        if self._chosen or model in self._seen:
            return
        self._seen.add(model)
        if self._said:
            log.info("model %s also has dynamic_batching on behind the merged gate (triton_batcher: off "
                     "would reload it without)", model)
            return
        self._pending.append(model)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._gather_s, self.say)

    def say(self) -> None:
        """The one warning line, now, for the models gathered so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._said or not self._pending:
            return
        self._said = True
        names = ", ".join(sorted(self._pending))
        self._pending.clear()
        log.warning(
            "dynamic_batching is on behind the merged gate for model(s) %s: Triton 2.51 was seen holding a "
            "request for its 500 ms idle wait now and then; set triton_batcher: off (smdp serve "
            "--triton-batcher off) to have the sidecar reload them without it (the gate forms the batches), "
            "or triton_batcher: keep to keep it without this warning", names)

    def close(self) -> None:
        """At stop: a line still gathering is said now rather than lost."""
        self.say()
