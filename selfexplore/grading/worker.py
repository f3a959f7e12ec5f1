"""Worker process for time-limited grading off the main thread (see timeout.py).

Protocol: one JSON request per stdin line, {"target": "module:function", "args": [...],
"seconds": s}; one JSON reply per stdout line, {"result": value or null}. It prints 'ready'
once sympy is imported and warmed up, and exits at end of input.
"""

from __future__ import annotations

import json
import sys

from selfexplore.grading.symbolic import warm_up
from selfexplore.grading.timeout import WORKER_MEMORY_BYTES, resolve, within

# Answer slightly before the caller's deadline, so it gets a reply instead of killing us.
_OWN_SHARE = 0.9


def _limit_memory() -> None:
    try:
        import resource
    except ImportError:  # not POSIX: the caller's kill still bounds the time
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = WORKER_MEMORY_BYTES
    if hard != resource.RLIM_INFINITY:
        limit = min(hard, limit)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main() -> None:
    warm_up()
    _limit_memory()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            fn = resolve(request["target"])
            result = within(float(request["seconds"]) * _OWN_SHARE, fn, *request["args"])
        except Exception:  # noqa: BLE001 - any failure is reported as 'no answer'
            result = None
        out.write(json.dumps({"result": result}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
