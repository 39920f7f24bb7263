"""Progress display of the fits: tqdm when installed (else one line per update on stderr), rank 0 only."""
from __future__ import annotations

import sys

from .collectives import is_rank_zero


class Progress:
    """A counter with a description and postfix; does nothing when disabled."""

    def __init__(self, desc: str, total: int | None, enabled: bool, group=None):
        self.enabled = bool(enabled) and is_rank_zero(group)
        self._bar = None
        self._desc = desc
        if not self.enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is optional
            return
        self._bar = tqdm(total=total, desc=desc, leave=True)

    def update(self, n: int = 1, **postfix) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif postfix:
            items = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"{self._desc}: {items}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
