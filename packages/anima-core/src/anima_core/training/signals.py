"""SIGINT/SIGTERM: the first signal asks the loop to finish the current optimizer step, save state + LoRA and
exit 130; a second one exits at once."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            print("\nsecond signal: exiting now without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print("\nstopping after the current step (state and LoRA will be saved; press Ctrl-C again to exit now)",
              file=sys.stderr, flush=True)

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an API caller's worker thread)
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
