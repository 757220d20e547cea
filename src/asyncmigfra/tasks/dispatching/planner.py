"""Where a predicted evacuation's wave plan is computed (protocol §3.7): CPU work that must
not hold the event loop.

A few VMs are planned in a worker thread (milliseconds). A large evacuation's plan takes
seconds (hundreds of VMs: the planner weighs the pending moves at every moment it
simulates), and a thread running Python code that long takes the interpreter's lock from
the event loop again and again (stalls of 100 ms and more on a loaded machine, measured with
``bench.planning``). So more than :data:`IN_THREAD_UP_TO` VMs are planned in a process of
their own: this module run as ``python -m``, the call (one of :data:`_CALLS`) and its
arguments pickled on its standard input, the plan (or the exception) on its standard output.
It is bounded by :data:`PLAN_WITHIN` s (then killed: the caller falls back) and killed when
its caller is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

__all__ = ["IN_THREAD_UP_TO", "PLAN_WITHIN", "Planner"]

R = TypeVar("R")

#: VMs planned in a thread; more are planned in a process of their own.
IN_THREAD_UP_TO = 32
#: s a plan may take before it is given up.
PLAN_WITHIN = 120.0
#: What the planning process may be asked to call (module, name).
_CALLS = frozenset(
    {("asyncmigfra.tasks.waves", "plan_waves"), ("asyncmigfra.tasks.waves", "replan")}
)
#: The directory holding the ``asyncmigfra`` package, for the process's ``PYTHONPATH``.
_PACKAGE_DIR = str(Path(__file__).resolve().parents[3])
#: Bytes of the process's standard error kept for the error it is reported with.
_STDERR_TAIL = 2000


class Planner:
    """Runs a planning function off the event loop (see the module)."""

    def __init__(self, *, within: float = PLAN_WITHIN, in_thread_up_to: int = IN_THREAD_UP_TO):
        self._within = within
        self._in_thread_up_to = in_thread_up_to

    async def run(self, size: int, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """``fn(*args, **kwargs)`` for a plan of ``size`` VMs, in a thread or a process.

        Raises:
            TimeoutError: it took more than :data:`PLAN_WITHIN` s.
            Exception: what ``fn`` raised, or ``RuntimeError`` when the process failed.
        """
        if size <= self._in_thread_up_to:
            return await asyncio.to_thread(fn, *args, **kwargs)
        call = (fn.__module__, fn.__qualname__)
        if call not in _CALLS:
            raise ValueError(f"{call} cannot be planned in a process")
        payload = pickle.dumps((call, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_DIR, env.get("PYTHONPATH")]))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            __name__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            async with asyncio.timeout(self._within):
                out, err = await process.communicate(payload)
        except BaseException:  # a timeout or a cancel: nobody waits for this plan
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(process.wait())
            raise
        if process.returncode != 0 or not out:
            tail = err[-_STDERR_TAIL:].decode(errors="replace").strip()
            raise RuntimeError(f"the planning process failed ({process.returncode}): {tail}")
        ok, value = pickle.loads(out)  # noqa: S301 - our own child's answer
        if not ok:
            raise cast(BaseException, value)
        return cast(R, value)


def _main() -> None:
    """The planning process: one call from standard input, its outcome to standard output."""
    call, args, kwargs = pickle.loads(sys.stdin.buffer.read())  # noqa: S301 - our parent's
    if tuple(call) not in _CALLS:
        raise SystemExit(f"not a planning call: {call!r}")
    module, name = call
    fn = getattr(importlib.import_module(module), name)
    try:
        outcome: tuple[bool, object] = (True, fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        outcome = (False, exc)
    sys.stdout.buffer.write(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    _main()
