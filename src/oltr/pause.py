"""Test-only pause points: a test that signals a child ``oltr`` process makes the child stop at
a named point of its work and wait there, so that the signal always arrives in the state under
test, whatever the machine's load (issue 24 §4).

``OLTR_TEST_PAUSE_AT=POINT[@N]`` pauses at the N-th time (default: the first) the process
reaches ``pause_point(POINT)``: it creates the file ``OLTR_TEST_PAUSE_FILE`` (the test waits for
it) and sleeps until a signal's handler raises (SIGTERM / SIGHUP / SIGINT: the command's one way
out), or :data:`LONGEST_PAUSE` seconds have passed, after which it goes on as if never paused.
Without the variable a pause point costs one dictionary look-up.

The points: ``curate:image`` (after each image exported into the staging folder: nothing is
installed yet) and ``train:step`` (before each training step).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT = "OLTR_TEST_PAUSE_AT"
PAUSE_FILE = "OLTR_TEST_PAUSE_FILE"
LONGEST_PAUSE = 300.0
_reached: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Wait here for a signal when ``OLTR_TEST_PAUSE_AT`` names this point (and this visit)."""
    wanted = os.environ.get(PAUSE_AT)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(count or 1):
        return
    marker = os.environ.get(PAUSE_FILE)
    if marker:
        Path(marker).touch()
    deadline = time.monotonic() + LONGEST_PAUSE
    while time.monotonic() < deadline:
        time.sleep(0.01)  # a signal's handler runs between (or interrupts) these sleeps


__all__ = ["LONGEST_PAUSE", "PAUSE_AT", "PAUSE_FILE", "pause_point"]
