"""The ``fake`` back-end's simulated migration job and its progress model (what a sample
of it shows: :mod:`.sampling`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from asyncmigfra.errors import HypervisorError, MigrationFailed, TaskCancelled, TaskError
from asyncmigfra.hypervisor.base import DomainState, JobStats, MigrationRequest, MigrationResult
from asyncmigfra.hypervisor.fake.cluster import _KIB, _MIB
from asyncmigfra.hypervisor.fake.faults import INJECTED
from asyncmigfra.hypervisor.fake.postcopy import break_post_copy
from asyncmigfra.hypervisor.fake.sampling import _POSTCOPY_DOWNTIME_MS, _JobSampling, _Phase

if TYPE_CHECKING:
    from asyncmigfra.hypervisor.fake.backend import FakeHypervisor
    from asyncmigfra.hypervisor.fake.cluster import FakeDomain, FakeHost

#: Simulated s before memory moves (the destination QEMU starting; the rig measured 0.3-0.5 s).
_SETUP_TIME = 0.3
#: Shortest memory pass (simulated s). QEMU syncs the dirty bitmap at most about every
#: 100 ms, and without a floor a slowly dirtying guest would iterate ever shorter passes.
_MIN_PASS = 0.1
#: ms added to every pre-copy switchover (device state, CPU stop/start).
_SWITCHOVER_OVERHEAD_MS = 10.0
#: QEMU's default downtime limit, ms.
_DEFAULT_MAX_DOWNTIME_MS = 300.0
_THROTTLE_STEP = 0.2
_THROTTLE_MAX = 0.99


class FakeMigrationJob(_JobSampling):
    """A simulated QEMU migration, computed lazily from the (scaled) loop clock.

    Model, all times in simulated seconds since the job began:

    * setup (:data:`_SETUP_TIME`, or the domain's ``setup-time``): nothing moves,
      ``stats()`` is ``None``;
    * with ``copy_storage`` (``all`` or ``inc``: the fake has no backing chains, both move
      the same), the disks of ``migrate_disks`` (all of the domain's when empty, see
      :meth:`FakeDomain.disks_to_copy`) are copied first at the bandwidth, as libvirt's NBD
      mirror does, the guest running: the samples show ``disk_*`` and, like libvirt's,
      ``memory_total`` 0, ``iteration`` 0 and no transfer rate; the guest's disk writes are
      not simulated (the mirror stays in sync once the copy is done);
    * pass 1 copies all guest memory at ``min(request.bandwidth, link bandwidth)``; each later
      pass copies what the guest dirtied during the previous one (``dirty_rate x duration``,
      at most all memory). ``auto_converge`` throttles the dirty rate from pass 3 on;
    * at the end of each pass the expected downtime (remaining / current rate) is compared
      with the max downtime; when it fits, the guest pauses and the rest is copied at the full
      link speed (switchover; QEMU ignores the bandwidth cap there), then the domain moves;
    * when its source or destination has a NIC limit (``nic-rate``), the job shares the NICs
      with the other migrations using them (:mod:`.links`): each rate here is then at most
      the job's max-min fair share, which changes as other migrations start and end
      (:mod:`.transfer` keeps what a phase had moved across such a change);
    * ``start_post_copy`` moves the guest at once and pulls what remains at the post-copy
      bandwidth (``postcopy_bandwidth``, else the pre-copy bandwidth);
    * ``set_bandwidth`` changes the rate the job wants from that moment on (what was sent so
      far stays; with a NIC limit it gets at most its share); 0 is the link's speed;
    * ``warm`` pauses the guest when memory starts to move (after setup and the disks), so a
      single pass suffices and the downtime is the whole memory copy;
    * ``stall_midway`` (the ``migrate-stall`` fault) stops the stream half-way through the
      first pass, as a cut network does: the samples go on, with the bytes processed frozen
      and no transfer rate, until the job is aborted (a switch to post-copy is refused then);
      a stalled job takes no share of a NIC.

    ``compressed``, ``compression`` (and its level and xbzrle cache), ``zerocopy``,
    ``parallel_connections``, ``rdma``, ``tls``, ``tls_destination``, ``p2p``, ``driver``,
    ``transport``, ``auto_converge_initial``/``_increment`` and ``synchronous_writes`` are
    accepted and not simulated. All reported times (``elapsed``, downtime) are simulated, so
    they read like a real host's whatever the ``time-scale``.

    The only scheduled thing is one ``loop.call_at`` timer for the next event; every public
    method first brings the job up to "now", so late timers never show stale state.
    """

    def __init__(
        self,
        *,
        owner: FakeHypervisor,
        domain: FakeDomain,
        source: FakeHost,
        destination: FakeHost,
        request: MigrationRequest,
        fail_midway: bool,
        disk_bytes: int = 0,
        break_post_copy: bool = False,
        stall_midway: bool = False,
    ) -> None:
        self.request = request
        self.domain = domain
        self.source = source
        self.destination = destination
        self._owner = owner
        self._cluster = owner.cluster
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._scale = owner.time_scale
        link = owner.bandwidth * _MIB
        self._link_bw = link
        requested = request.bandwidth
        #: What the job wants while it copies disks or memory (the switchover: ``_link_bw``).
        self._bw = min(link, requested * _MIB) if requested else link
        #: The post-copy rate; ``None``: the pre-copy one.
        self._post_bw: float | None = (
            min(link, request.postcopy_bandwidth * _MIB) if request.postcopy_bandwidth else None
        )
        #: Bytes/s the current phase moves at now (what it wants, or its NIC share).
        self._rate = self._bw
        self._seg_at = 0.0
        self._seg_moved = 0.0
        links = owner.cluster.links
        self._links = links if links.limited(source, destination) else None
        # Pages the balloon took from the guest are not sent (QEMU skips them).
        self._mem = (domain.memory if domain.balloon is None else domain.balloon) * _KIB
        self._max_downtime = (
            float(request.initial_downtime)
            if request.initial_downtime is not None
            else _DEFAULT_MAX_DOWNTIME_MS
        )
        self._fail_midway = fail_midway
        #: ``postcopy-break``: the post-copy phase breaks half-way (fake/postcopy.py).
        self._break_post_copy = break_post_copy
        self._stall_midway = stall_midway
        #: Bytes of memory left in the pass when the stream stalled.
        self._stalled_remaining = 0.0
        #: Bytes of disk the storage copy moves before memory (0: no storage copy).
        self._disk = max(0, disk_bytes)
        self._disk_start = 0.0

        self._phase = _Phase.SETUP
        #: Number of the pass in progress (0 during setup).
        self.iteration = 0
        #: Passes finished before switchover / post-copy.
        self._completed = 0
        self._iter_start = 0.0
        self._iter_amount = 0.0
        self._dirty_acc = 0.0
        self._dirty_mark = 0.0
        self._processed_base = 0.0
        self._expected: float | None = None
        self._throttle = 0.0
        self._switch_start = 0.0
        self._switch_amount = 0.0
        self._switch_duration = 0.0
        self._post_start = 0.0
        self._post_amount = 0.0
        self._paused_by_job = False
        self._pause_time: float | None = None

        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0
        self._iter_event = asyncio.Event()
        self._finished = asyncio.Event()
        self._outcome: MigrationResult | TaskError | None = None
        self._final_stats: JobStats | None = None

    def __repr__(self) -> str:
        return (
            f"FakeMigrationJob({self.domain.name!r} {self.source.name}->"
            f"{self.destination.name}, {self._phase.value}, iteration={self.iteration})"
        )

    # ---- lifecycle (called by FakeHypervisor) -------------------------------------------

    def _begin(self) -> None:
        self.domain.job = self
        self.destination.incoming[self.domain.name] = self.domain.memory
        self._cluster.jobs.add(self)
        if self._links is not None:
            self._links.join(self)
        self._reschedule()

    def _begin_resumed(self, remaining: float) -> None:
        """Start as the resumed post-copy of a broken one: ``remaining`` bytes still to pull,
        the guest (paused by the break) to run on the destination."""
        if self._links is not None:  # the others up to now, before the NICs' shares change
            self._links.advance(self._loop.time())
        now = self._now()
        self._phase = _Phase.POSTCOPY
        self._post_start = now
        self._post_amount = remaining
        self._paused_by_job = True
        self._begin()
        self._moving(now, self._post_rate())
        self._reschedule()

    def _finish_now(self, outcome: MigrationResult) -> None:
        """End a job that moved no memory (offline)."""
        self._end(0.0, outcome, None)

    # ---- the simulation -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    @property
    def throttle(self) -> float:
        """The auto-converge CPU throttle (0-0.99) of the current pass."""
        return self._throttle

    @property
    def bandwidth(self) -> float:
        """The pre-copy transfer rate the job wants now (bytes/s; with a NIC limit it may get
        less: ``_rate``)."""
        return self._bw

    @property
    def post_copy_bandwidth(self) -> float:
        """The post-copy transfer rate the job wants (bytes/s)."""
        return self._post_rate()

    @property
    def stalled(self) -> bool:
        """The stream stopped moving (``migrate-stall``)."""
        return self._phase is _Phase.STALLED

    @property
    def max_downtime(self) -> float:
        """The downtime limit (ms) the next convergence check uses."""
        return self._max_downtime

    def _now(self) -> float:
        return (self._loop.time() - self._t0) * self._scale

    def _rerated(self) -> None:
        if self._phase is _Phase.SWITCHOVER:
            bytes_done = self._moved_by(self._switch_amount)
            self._switch_duration = bytes_done - self._switch_start + _SWITCHOVER_OVERHEAD_MS / 1000

    def _wanted(self) -> float | None:
        """What the current phase wants to move at, when a bandwidth setting governs it."""
        if self._phase in (_Phase.DISKS, _Phase.PRECOPY):
            return self._bw
        if self._phase is _Phase.POSTCOPY:
            return self._post_rate()
        return None  # nothing moves, or the switchover (QEMU lifts the cap there)

    def _pass_end(self) -> float:
        return max(self._iter_start + _MIN_PASS, self._moved_by(self._iter_amount))

    def _midway_at(self) -> float:
        return self._moved_by(self._iter_amount / 2)

    def _next_event(self) -> float | None:
        phase = self._phase
        if phase is _Phase.SETUP:
            return _SETUP_TIME if self.domain.setup_time is None else self.domain.setup_time
        if phase is _Phase.DISKS:
            return self._moved_by(self._disk)
        if phase is _Phase.PRECOPY:
            if (self._fail_midway or self._stall_midway) and self.iteration == 1:
                return self._midway_at()
            return self._pass_end()
        if phase is _Phase.SWITCHOVER:
            return self._switch_start + self._switch_duration
        if phase is _Phase.POSTCOPY:
            if self._break_post_copy:
                return self._moved_by(self._post_amount / 2)
            return self._moved_by(self._post_amount)
        return None

    def _advance(self, now: float) -> None:
        """Process every event up to ``now``, each at its own time."""
        while True:
            at = self._next_event()
            if at is None or at > now:
                return
            self._fire(at)

    def _fire(self, at: float) -> None:
        phase = self._phase
        if phase is _Phase.SETUP and self._disk > 0:
            self._phase = _Phase.DISKS
            self._disk_start = at
            self._moving(at, self._bw)
        elif phase in (_Phase.SETUP, _Phase.DISKS):
            if self.request.mode == "warm":
                self._pause_guest(at)
            self._start_pass(at, self._mem)
        elif phase is _Phase.PRECOPY:
            if self._stall_midway and self.iteration == 1:
                self._stall(at)
                return
            if self._fail_midway and self.iteration == 1:
                self._fail(at, MigrationFailed(INJECTED))
                return
            self._end_pass(at)
        elif phase is _Phase.SWITCHOVER:
            self._complete(at, post_copy=False)
        elif phase is _Phase.POSTCOPY and self._break_post_copy:
            break_post_copy(self, at, remaining=self._post_amount / 2)
        elif phase is _Phase.POSTCOPY:
            self._complete(at, post_copy=True)

    def _start_pass(self, at: float, amount: float) -> None:
        if self._phase is _Phase.PRECOPY:
            self._next_segment(at)
        else:
            self._moving(at, self._bw)
        self._phase = _Phase.PRECOPY
        self.iteration += 1
        self._iter_start = at
        self._iter_amount = amount
        self._dirty_acc = 0.0
        self._dirty_mark = at
        if self.request.auto_converge and self.iteration >= 3:
            self._throttle = min(_THROTTLE_MAX, _THROTTLE_STEP * (self.iteration - 2))
        self._wake_iteration_waiters()

    def _accumulate(self, now: float) -> None:
        """Account the memory dirtied since the last mark at the current rate."""
        if self._phase is _Phase.PRECOPY and now > self._dirty_mark:
            self._dirty_acc = min(
                float(self._mem), self._dirty_acc + self._dirty_rate() * (now - self._dirty_mark)
            )
            self._dirty_mark = now

    def _end_pass(self, at: float) -> None:
        self._accumulate(at)
        remaining = self._dirty_acc
        self._processed_base += self._iter_amount
        self._completed = self.iteration
        self._expected = remaining / self._rate * 1000.0
        if self._expected <= self._max_downtime:
            self._start_switchover(at, remaining)
        else:
            self._start_pass(at, remaining)

    def _stall(self, at: float) -> None:
        """The stream stops: what was sent stays sent, nothing more moves."""
        self._accumulate(at)
        sent, remaining = self._remaining_at(at)
        self._processed_base += sent
        self._stalled_remaining = remaining
        self._phase = _Phase.STALLED
        self._moving(at, None)  # its NIC shares go to the others

    def _start_switchover(self, at: float, amount: float) -> None:
        self._phase = _Phase.SWITCHOVER
        self._switch_start = at
        self._switch_amount = amount
        # With nothing left to send the NICs are free for the others.
        self._moving(at, self._link_bw if amount > 0 or self._links is None else None)
        self._switch_duration = amount / self._rate + _SWITCHOVER_OVERHEAD_MS / 1000.0
        self._pause_guest(at)
        if self._pause_time is None:  # the user had paused it: downtime is the switchover
            self._pause_time = at

    def _pause_guest(self, at: float) -> None:
        if self.domain.state is DomainState.RUNNING:
            self.domain._apply_state(DomainState.PAUSED)
            self._paused_by_job = True
            if self._pause_time is None:
                self._pause_time = at

    def _complete(self, at: float, *, post_copy: bool) -> None:
        dom, src, dst = self.domain, self.source, self.destination
        name = dom.name
        if src.domains.get(name) is not dom:
            self._fail(at, MigrationFailed("Migration failed: domain vanished from the source"))
            return
        if post_copy:
            transferred = self._processed_base + self._post_amount
            downtime = _POSTCOPY_DOWNTIME_MS
        else:
            transferred = self._processed_base + self._switch_amount
            downtime = (at - (self._pause_time or at)) * 1000.0
        final = self._snapshot(at)
        user_paused = dom.state is DomainState.PAUSED and not self._paused_by_job
        paused = self.request.paused or user_paused
        # Move: like PERSIST_DEST|UNDEFINE_SOURCE with persist, else like plain migrate3.
        del src.domains[name]
        if not self.request.persist and dom.persistent:
            src.domains[name] = dom.copy_definition()
        existing = dst.domains.get(name)
        dom.persistent = self.request.persist or (existing is not None and existing.persistent)
        dst.domains[name] = dom
        dom.job = None
        dom._apply_state(DomainState.PAUSED if paused else DomainState.RUNNING)
        result = MigrationResult(
            downtime=round(downtime, 3),
            iterations=self._completed,
            post_copy=post_copy,
            transferred=int(transferred),
        )
        self._end(at, result, final)

    def _fail(self, at: float, error: TaskError) -> None:
        """End unsuccessfully: the guest stays on the source, running again if we paused it."""
        final = self._snapshot(at)
        if (
            self._paused_by_job
            and self.domain.job is self
            and self.domain.state is DomainState.PAUSED
        ):
            self.domain._apply_state(DomainState.RUNNING)
        self._end(at, error, final)

    def _end(self, at: float, outcome: MigrationResult | TaskError, final: JobStats | None) -> None:
        self._final_stats = final
        self._phase = _Phase.DONE
        self._outcome = outcome
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.domain.job is self:
            self.domain.job = None
        self.destination.incoming.pop(self.domain.name, None)
        self._cluster.jobs.discard(self)
        if self._links is not None:
            # (A post-copy finished by _shutdown ends in the future: the NICs free up now.)
            self._links.leave(self, min(self._loop_time(at), self._loop.time()))
        self._finished.set()
        self._wake_iteration_waiters()

    def _wake_iteration_waiters(self) -> None:
        event, self._iter_event = self._iter_event, asyncio.Event()
        event.set()

    # ---- timer --------------------------------------------------------------------------

    def _reschedule(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        at = self._next_event()
        if at is None:
            return
        self._handle_at = at
        self._handle = self._loop.call_at(self._t0 + at / self._scale, self._on_timer)

    def _on_timer(self) -> None:
        self._handle = None
        if self._phase is _Phase.DONE:
            return
        # The loop may run a timer a hair early; the event it was set for is due regardless.
        if self._links is not None:
            self._links.advance(max(self._loop.time(), self._loop_time(self._handle_at)))
            return
        self._advance(max(self._now(), self._handle_at))
        self._reschedule()

    def _sync(self) -> None:
        if self._phase is _Phase.DONE:
            return
        if self._links is not None:
            self._links.advance(self._loop.time())
            return
        self._advance(self._now())
        self._reschedule()

    def _guest_changing(self) -> None:
        """The guest's state or dirty rate is about to change: account for the time so far."""
        if self._phase is _Phase.DONE:
            return
        now = self._now()
        if self._links is not None:
            self._links.advance(self._loop.time())
        else:
            self._advance(now)
        self._accumulate(now)
        self._reschedule()

    def _shutdown(self) -> None:
        """The owning agent closes: finish a post-copy (the guest already runs on the
        destination), abort anything else (the guest stays on the source)."""
        self._sync()
        if self._phase is _Phase.POSTCOPY:
            self._complete(self._moved_by(self._post_amount), post_copy=True)
        elif self._phase is not _Phase.DONE:
            self._fail(self._now(), TaskCancelled("migration job aborted: hypervisor closed"))

    # ---- MigrationJob -------------------------------------------------------------------

    async def stats(self) -> JobStats | None:
        self._sync()
        if self._phase is _Phase.DONE:
            return self._final_stats
        return self._snapshot(self._now())

    async def wait_iteration(self, after: int) -> int:
        """Return once pass ``after + 1`` has begun, or at once with the final pass number
        when the job has ended (which may not exceed ``after``)."""
        while True:
            self._sync()
            if self.iteration > after or self._phase is _Phase.DONE:
                return self.iteration
            await self._iter_event.wait()

    async def wait(self) -> MigrationResult:
        self._sync()
        await self._finished.wait()
        outcome = self._outcome
        if isinstance(outcome, MigrationResult):
            return outcome
        assert outcome is not None
        # A fresh exception per call: re-raising one instance grows its traceback.
        raise type(outcome)(str(outcome))

    async def set_max_downtime(self, ms: int) -> None:
        """Takes effect at the end of the current pass, when QEMU next compares."""
        if ms < 0:
            raise HypervisorError(f"invalid argument: max downtime must be >= 0, got {ms}")
        self._sync()
        self._max_downtime = float(ms)

    async def set_bandwidth(self, mibs: int, *, post_copy: bool = False) -> None:
        """From now on at ``mibs`` MiB/s (at most the link's speed; 0: the link's speed)."""
        if mibs < 0:
            raise HypervisorError(f"invalid argument: bandwidth must be >= 0, got {mibs}")
        self._sync()
        if self._phase is _Phase.DONE:
            return
        rate = self._link_bw if mibs == 0 else min(self._link_bw, mibs * _MIB)
        if post_copy:
            self._post_bw = rate
        else:
            self._bw = rate
        wanted = self._wanted()
        if wanted is not None:  # what the phase moved so far stays, at the old rate
            self._retarget(self._now(), wanted)
        self._reschedule()

    async def start_post_copy(self) -> None:
        if self.request.mode != "post-copy":
            raise HypervisorError(
                "Requested operation is not valid: switching to post-copy requires the "
                "migration to be started in post-copy mode"
            )
        self._sync()
        if self._phase is _Phase.DISKS:
            raise HypervisorError(
                "Requested operation is not valid: post-copy can start only once memory "
                "moves (the disks are still being copied)"
            )
        if self._phase is _Phase.STALLED:
            raise HypervisorError(
                "Requested operation is not valid: the migration stream moves no data, a"
                " switch to post-copy would leave the guest without its memory"
            )
        if self._phase not in (_Phase.SETUP, _Phase.PRECOPY):
            return  # already post-copy, switching over, or over: nothing left to switch
        now = self._now()
        if self._phase is _Phase.PRECOPY:
            sent, remaining = self._remaining_at(now)
            self._processed_base += sent
        else:
            remaining = float(self._mem)
        self._moving(now, self._post_rate())
        self._phase = _Phase.POSTCOPY
        self._post_start = now
        self._post_amount = remaining
        self._reschedule()

    async def suspend_source(self) -> None:
        self._sync()
        if self._phase is _Phase.DONE:
            return
        now = self._now()
        self._accumulate(now)
        self._pause_guest(now)

    async def abort(self) -> None:
        """Cancel the job; the guest keeps running on the source.

        Like QEMU, a job already in post-copy cannot be aborted: the guest runs on the
        destination and the source no longer has its memory.
        """
        self._sync()
        if self._phase is _Phase.DONE:
            return
        if self._phase is _Phase.POSTCOPY:
            raise HypervisorError(
                "Requested operation is not valid: cannot abort migration in post-copy mode"
            )
        self._fail(self._now(), TaskCancelled("migration job aborted"))
