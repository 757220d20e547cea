"""Role: migration. Moving one VM (the engine and what goes around it) and swapping two.

The engine starts the job, watches it, steers it and reports it honestly (see
:mod:`~asyncmigfra.migration.engine` for how).

The package re-exports nothing; import from the defining module:

- :mod:`~asyncmigfra.migration.context`: :class:`EngineContext`, what the engine needs from
  the task running it;
- :mod:`~asyncmigfra.migration.plan`: :class:`MigrationPlan`, parameter resolution
  (``plan_migration``, ``plan_for``, ``memory_of``) and the downtime schedule;
- :mod:`~asyncmigfra.migration.policy`: :class:`ConvergencePolicy`;
- :mod:`~asyncmigfra.migration.prediction`: ``predict`` (will a migration converge, live or
  post-copy, how long, what downtime) and its :class:`Verdict`, a pure model of the engine
  and the hypervisor; its inputs are defined in
  :mod:`~asyncmigfra.migration.prediction_inputs`;
- :mod:`~asyncmigfra.migration.progress`: progress event fields (``_Progress``) and
  ``estimate_eta``, ``disk_phase``;
- :mod:`~asyncmigfra.migration.companions`: the steps around the job: devices out and back
  in, repin + resume, ``reduce-memory``, the pscom hook, ``_unwind``;
- :mod:`~asyncmigfra.migration.watching`: ``watch``, the running job's samples, progress
  events, the convergence policy's steps, the completion and progress timeouts;
- :mod:`~asyncmigfra.migration.steering`: :class:`MigrationSteering`, the handle of a running
  job that ``tune migration`` reaches, and :class:`Tuning`;
- :mod:`~asyncmigfra.migration.engine`: ``migrate``, ``carry_out`` and the job itself
  (retries, the job's start and end, cancel);
- :mod:`~asyncmigfra.migration.swap`: ``swap-with``, two VMs trading hosts, each half a
  whole migration through the engine.
"""
