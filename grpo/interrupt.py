"""Stopping a run on request without losing it: Ctrl-C (SIGINT) or SIGTERM (a scheduler's pre-emption) while a
loop runs inside `StopOnSignal` only sets a flag; the loop finishes its step, saves a checkpoint and returns,
and `run.resume=latest` continues from there. A second signal stops at once, as usual."""
from __future__ import annotations

import signal
import threading


class StopOnSignal:
    """`with StopOnSignal() as stop:` ... `if stop.requested:` checkpoint and leave the loop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:  # the second request: the default behaviour (KeyboardInterrupt / termination)
            handler = self._previous.get(signum, signal.SIG_DFL)
            if callable(handler):
                return handler(signum, frame)
            signal.signal(signum, handler)
            signal.raise_signal(signum)
            return None
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(send it again to stop at once)", flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
