"""The one way blocking calls leave the event loop: :func:`run_blocking`.

Every blocking hypervisor call (libvirt's C API) runs in a dedicated thread pool through this
helper, never on the loop and never on the default executor (aiomqtt's connect uses that one).

Two details matter:

* contextvars (structlog's bound ``task_id``/``vm``) are copied into the thread, because
  ``loop.run_in_executor`` does not do it;
* cancellation never orphans the thread. A cancelled caller keeps waiting (shielded) until the
  thread returns, then re-raises ``CancelledError``. An orphaned thread would keep working
  unseen and hold a pool slot; the caller that wants the work to stop must make the call
  return (for a migration: abort the job), which is the engine's job, not this helper's.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar

__all__ = ["run_blocking"]

P = ParamSpec("P")
T = TypeVar("T")


async def run_blocking(
    executor: Executor | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``fn(*args, **kwargs)`` in ``executor`` and return its result.

    If the awaiting task is cancelled, wait for the thread to finish before re-raising.
    """
    ctx = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(executor, functools.partial(ctx.run, fn, *args, **kwargs))
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True  # keep waiting: the thread must not be orphaned
        except Exception:  # noqa: BLE001 - the result is read from fut below
            break
    if cancelled:
        raise asyncio.CancelledError
    return fut.result()
