"""Role: migration. The engine: start the job, watch it, steer it, and report it honestly.

The original blocked in one ``virDomainMigrate3`` call with no progress, no timeout and no
way to stop it. Here the hypervisor only starts the job (:meth:`Hypervisor.begin_migration`)
and this engine owns the rest:

* **progress** every ``agent.progress-interval`` and on every memory iteration, with a
  ``percent`` that never goes backwards and reaches 100 only when the job completed;
* **convergence policy**, decided once per memory iteration, never on one sample: when an
  iteration leaves no less to copy than the one before, the downtime target goes up one step
  (a geometric schedule up to ``max-downtime``, as oVirt does); when the target is at its
  maximum and the copy still stalls, a ``post-copy`` migration switches to post-copy.
  Every change is announced in a progress event's ``action``;
* **completion timeout** (``completion-timeout``, default 150 s per GiB, at least 120 s), then
  the ``timeout-action``: ``abort`` (result ``code: timeout``), ``post-copy`` or ``suspend``;
* **cancel**: a cancelled engine aborts the job (bounded) and waits for it to end, so the VM
  keeps running on the source and no thread is left behind.

The package re-exports nothing; import from the defining module:

- :mod:`~asyncmigfra.migration.context`: :class:`EngineContext`, what the engine needs from
  the task running it;
- :mod:`~asyncmigfra.migration.plan`: :class:`MigrationPlan`, parameter resolution
  (``plan_migration``, ``plan_for``, ``memory_of``) and the downtime schedule;
- :mod:`~asyncmigfra.migration.policy`: :class:`ConvergencePolicy`;
- :mod:`~asyncmigfra.migration.progress`: progress event fields (``_Progress``) and
  ``estimate_eta``;
- :mod:`~asyncmigfra.migration.companions`: the steps around the job: devices out and back
  in, repin + resume, ``reduce-memory``, the pscom hook, ``_unwind``;
- :mod:`~asyncmigfra.migration.engine`: ``migrate``, ``carry_out`` and the job itself
  (retries, sampling, steering, completion timeout, cancel);
- :mod:`~asyncmigfra.migration.swap`: ``swap-with``, two VMs trading hosts, each half a
  whole migration through the engine.
"""
