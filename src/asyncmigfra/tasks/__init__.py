"""Role: tasks. What happens to an accepted task, from the journal to its result entry.

- :mod:`~asyncmigfra.tasks.dispatching`: the dispatcher (jobs, per-VM lanes, expansion of
  ``evacuate``, remembered ids);
- :mod:`~asyncmigfra.tasks.running`: one subtask run against the hypervisor;
- :mod:`~asyncmigfra.tasks.outcomes`: where the end of a subtask becomes its result entry;
- :mod:`~asyncmigfra.tasks.placement`: where each VM of an evacuation goes;
- :mod:`~asyncmigfra.tasks.journal`: accepted tasks and owed results, kept on disk;
- :mod:`~asyncmigfra.tasks.hostpolicy`: what a task may ask of the host.

The package re-exports nothing; import from the defining module.
"""
