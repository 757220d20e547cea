"""The people-facing client commands: ``send``, ``migrate``, ``status``, ``watch`` and friends.

Why a package of its own, between :mod:`asyncmigfra.cli` and the agent: these commands are
*clients* of the wire protocol (docs/protocol.md), exactly like a scheduler. They must never
reach into the agent's machinery (dispatcher, hypervisors), only publish tasks and read what
agents publish, through :class:`asyncmigfra.transport.mqtt.ToolClient`. Keeping them here lets
import-linter enforce that (``.importlinter``: cli > console > demo > app ...), and keeps
``asyncmigfra.cli`` a thin argument parser.

Modules:

* :mod:`~asyncmigfra.console.exits` — exit codes and the exception that carries one;
* :mod:`~asyncmigfra.console.connection` — ``--broker``, TLS, credentials, topic names;
* :mod:`~asyncmigfra.console.session` — one broker connection with a single inbox of
  results, events, presence messages and Ctrl-C presses;
* :mod:`~asyncmigfra.console.tasks` — task payloads (pure) and how a result is judged;
* (:mod:`asyncmigfra.terminal`, below the console so the demo uses it too: untrusted text
  never reaches a terminal raw, the one escaping function every output path goes through;)
* :mod:`~asyncmigfra.console.output` — rich on a terminal, plain text in a pipe, JSON lines;
* :mod:`~asyncmigfra.console.follow` — the live migration view and its summary;
* :mod:`~asyncmigfra.console.attach` — ``follow ID``: that view for a task started elsewhere;
* :mod:`~asyncmigfra.console.history` — ``history``: what the agents did, newest first;
* :mod:`~asyncmigfra.console.commands` — the commands themselves.
"""
