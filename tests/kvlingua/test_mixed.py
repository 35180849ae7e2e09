"""The one-tokenizer schedule's bookkeeping, by hand (the generation itself: ``test_generate.py``)."""
from __future__ import annotations

from kvlingua.mixed import Ledger, Run


def test_ledger_says_who_reads_what_from_whom():
    led = Ledger("a", 4)  # the prompt's first 4 positions, read by a
    assert led.unread("a") == [] and led.unread("b") == [Run("a", 0, 4)]
    assert led.wrote("a", 3) == Run("a", 0, 7)  # its first segment: the prompt and what it wrote
    assert led.unread("b") == [Run("a", 0, 7)]
    assert led.wrote("b", 2) == Run("b", 7, 9)
    assert led.wrote("c", 1) == Run("c", 9, 10)
    # a reads only what it has not read: b's and c's runs, each from the model that computed it
    assert led.unread("a") == [Run("b", 7, 9), Run("c", 9, 10)]
    assert led.unread("b") == [Run("c", 9, 10)]
    assert led.runs() == [Run("a", 0, 7), Run("b", 7, 9), Run("c", 9, 10)]
    assert led.wrote("a", 2) == Run("a", 10, 12) and led.unread("a") == []
