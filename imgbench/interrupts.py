"""Turning SIGTERM into ``KeyboardInterrupt`` so a benchmark run tears down what it created.

pytest runs fixture finalizers after a ``KeyboardInterrupt``, so a run that
gets SIGTERM (from a CI cancel, ``timeout`` or ``kill``) deletes its cloud
resources the same way as after Ctrl-C. The first SIGTERM or SIGINT raises
``KeyboardInterrupt`` in the main thread; later ones are logged and ignored,
so a second signal (a terminal sends SIGINT to every process of the group,
and the controller forwards it too) cannot cut the teardown short. SIGKILL
still ends the process at once; the run ledger then lists what is left.

The pytest-xdist controller forwards the signal to its worker processes,
found through Linux's ``/proc/<pid>/task/<tid>/children``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

_state = {"interrupted": False, "forward": False}


def was_interrupted() -> bool:
    """Return True once the process got SIGTERM or SIGINT, or pytest reported a KeyboardInterrupt."""
    return _state["interrupted"]


def note_interrupted() -> None:
    _state["interrupted"] = True


def install_handlers(*, forward_to_children: bool) -> bool:
    """Install the SIGTERM and SIGINT handlers; return False outside the main thread, where Python cannot."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _state["forward"] = forward_to_children
    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    return True


def _handle(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if _state["forward"]:
        _forward(signum)
    if _state["interrupted"]:
        logger.warning("got %s again during teardown; ignoring it so the teardown can finish "
                       "(send SIGKILL to stop at once)", name)
        return
    _state["interrupted"] = True
    raise KeyboardInterrupt(f"got {name}")


def child_pids(pid: int | None = None) -> list[int]:
    """Return the ids of the direct child processes of ``pid`` (Linux only; empty elsewhere)."""
    children = []
    for task in Path(f"/proc/{pid or os.getpid()}/task").glob("*"):
        try:
            children += [int(part) for part in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return children


def _forward(signum: int) -> None:
    for child in child_pids():
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            continue
