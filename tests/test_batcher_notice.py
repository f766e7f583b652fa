"""The start-up warning about Triton's dynamic batcher behind the merged gate: one line per start for
all the models seen together, naming the setting that removes the cause; none once the operator chose."""

from __future__ import annotations

import asyncio
import logging

from plugin.batcher_notice import TritonBatcherNotice


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "dynamic_batching" in r.getMessage()]


def test_models_seen_together_get_one_line_naming_triton_batcher_off(caplog):
    async def run() -> None:
        notice = TritonBatcherNotice(chosen=False, gather_s=0.05)
        for name in ("b_model", "a_model", "b_model", "a_model"):  # read again (a reload): still one line
            notice.seen(name)
        assert _warnings(caplog) == []  # gathering
        await asyncio.sleep(0.1)
        notice.seen("late_model")  # after the line: INFO only
        notice.seen("a_model")
        notice.close()

    with caplog.at_level(logging.INFO, logger="smdp.sidecar"):
        asyncio.run(run())
    lines = _warnings(caplog)
    assert len(lines) == 1
    assert "a_model, b_model" in lines[0] and "triton_batcher: off" in lines[0] and "late_model" not in lines[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "late_model" in infos[0]


def test_a_stop_before_the_line_still_says_it_once(caplog):
    async def run() -> None:
        notice = TritonBatcherNotice(chosen=False, gather_s=60)
        notice.seen("m")
        notice.close()
        notice.close()

    asyncio.run(run())
    assert len(_warnings(caplog)) == 1


def test_nothing_is_said_when_the_operator_chose(caplog):
    async def run() -> None:
        notice = TritonBatcherNotice(chosen=True, gather_s=0.01)
        notice.seen("m")
        await asyncio.sleep(0.05)
        notice.close()

    with caplog.at_level(logging.INFO, logger="smdp.sidecar"):
        asyncio.run(run())
    assert [r for r in caplog.records if "dynamic_batching" in r.getMessage()] == []
