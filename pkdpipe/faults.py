"""Named points where a test can kill the process, to prove that nothing is lost at any of them.

`PKDPIPE_KILL_AT=<point>` in the environment makes the process kill itself with SIGKILL (no cleanup,
no `finally`, as a power cut or the OOM killer would) when it reaches that point; `<point>#<n>` at
the n-th time it gets there. Unset, a point costs one dictionary lookup. tests/faults/ runs real
processes against every point.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter[str] = Counter()


def point(name: str) -> None:
    target = os.environ.get("PKDPIPE_KILL_AT")
    if not target:
        return
    wanted, _, nth = target.partition("#")
    if wanted == name:
        _reached[name] += 1
        if _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
