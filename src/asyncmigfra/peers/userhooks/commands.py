"""Running a command hook: in a session (and process group) of its own, stdin ``/dev/null``,
the last :data:`OUTPUT_TAIL_BYTES` of stdout and stderr kept; on a timeout or a cancellation
the whole process group gets SIGTERM, then SIGKILL :data:`KILL_GRACE` s later."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from typing import Any

import structlog

from asyncmigfra.peers.userhooks.call import HookCall, _clip, _Failure
from asyncmigfra.peers.userhooks.environment import _Hidden, hook_base_environment, hook_environment
from asyncmigfra.settings import HookSettings

log = structlog.stdlib.get_logger("asyncmigfra.userhooks")

#: Bytes of stdout and of stderr kept per command (the end of each).
OUTPUT_TAIL_BYTES = 4096
#: s between SIGTERM and SIGKILL to a command's process group.
KILL_GRACE = 2.0
#: s to read the rest of a command's output after it exited (a child it left behind may keep
#: the pipes open; the hook's result does not wait for it).
DRAIN_GRACE = 0.5
#: s a cancelled task waits for its command's start to finish, so it can stop what started.
SPAWN_LIMIT = 5.0


class _Capture(asyncio.SubprocessProtocol):
    """Keeps the tail of stdout and stderr; tells when the process exited and the pipes closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.tails: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()
        self._open = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        tail = self.tails.get(fd)
        if tail is None:
            return
        tail += data
        if len(tail) > OUTPUT_TAIL_BYTES:
            del tail[:-OUTPUT_TAIL_BYTES]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open.discard(fd)
        if not self._open and not self.drained.done():
            self.drained.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def last_line(self) -> str:
        """The last non-empty line of stderr, else of stdout."""
        for fd in (2, 1):
            lines = self.tails[fd].decode(errors="replace").splitlines()
            for line in reversed(lines):
                if line.strip():
                    return _clip(line)
        return ""


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already
    except PermissionError:  # pragma: no cover - a member changed its user (setuid)
        log.warning("hook.kill_refused", pgid=pgid, signal=sig.name)


async def _stop_group(transport: asyncio.SubprocessTransport, capture: _Capture) -> None:
    """SIGTERM to the command's process group, SIGKILL after :data:`KILL_GRACE` s, reap.

    The SIGKILL is sent even if this is cancelled while waiting (it is synchronous); the
    event loop's child watcher reaps the process in any case.
    """
    pgid = transport.get_pid()
    try:
        if not capture.exited.done():
            _signal_group(pgid, signal.SIGTERM)
            try:
                async with asyncio.timeout(KILL_GRACE):
                    await asyncio.shield(capture.exited)
            except TimeoutError:
                pass
    finally:
        # Also hits children that survived the SIGTERM (or ignore it) after the leader exited.
        _signal_group(pgid, signal.SIGKILL)
    await asyncio.shield(capture.exited)


async def _stop_spawned(
    spawn: asyncio.Future[tuple[asyncio.SubprocessTransport, Any]], capture: _Capture
) -> None:
    """Cancelled while the command was being started: let the start finish, then stop the
    whole group. asyncio's own clean-up of a cancelled start (Python 3.11) kills only the
    leader and then waits until every process holding the output pipes has exited, which a
    background child of the hook can make last as long as that child runs."""
    done, _ = await asyncio.wait({spawn}, timeout=SPAWN_LIMIT)
    if not done:
        # Hangs starting: hand it to asyncio's own clean-up rather than leave it unowned.
        log.warning("hook.start_abandoned", limit=SPAWN_LIMIT)
        spawn.cancel()
        return
    if spawn.cancelled() or spawn.exception() is not None:
        return  # it never started: nothing of it runs that we could stop
    transport, _ = spawn.result()
    try:
        await _stop_group(transport, capture)
    finally:
        transport.close()


async def _run_command(hook: HookSettings, call: HookCall, hidden: _Hidden = _Hidden()) -> None:
    command = hook.command
    assert command is not None
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    env = hook_base_environment(os.environ, secret_names=hidden.names, secret_values=hidden.values)
    env.update(hook_environment(hook, call))
    loop = asyncio.get_running_loop()
    capture = _Capture(loop)
    spawn = asyncio.ensure_future(
        loop.subprocess_exec(
            lambda: capture,
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    )
    try:
        transport, _ = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        await _stop_spawned(spawn, capture)
        raise
    except OSError as exc:
        raise _Failure(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    except ValueError as exc:  # pragma: no cover - e.g. a NUL the settings loader let through
        raise _Failure(f"cannot run {argv[0]}: {exc}") from None
    try:
        try:
            async with asyncio.timeout(hook.timeout):
                await asyncio.shield(capture.exited)
        except TimeoutError:
            await _stop_group(transport, capture)
            raise _Failure(f"no answer within {hook.timeout:g} s") from None
        except BaseException:
            # Cancelled: the command must not outlive the task.
            await _stop_group(transport, capture)
            raise
        try:
            async with asyncio.timeout(DRAIN_GRACE):
                await asyncio.shield(capture.drained)
        except TimeoutError:
            log.info("hook.output_left_open", hook=hook.name, pid=transport.get_pid())
    finally:
        transport.close()
    status = transport.get_returncode()
    if status == 0:
        return
    if status is not None and status < 0:
        try:
            what = f"killed by {signal.Signals(-status).name}"
        except ValueError:
            what = f"killed by signal {-status}"
    else:
        what = f"exit status {status}"
    line = capture.last_line()
    raise _Failure(f"{what}: {line}" if line else what)
