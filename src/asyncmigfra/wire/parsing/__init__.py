"""Task payload -> :class:`~asyncmigfra.model.TaskMessage`, with the original's rules and texts.

Why this parser is hand-written instead of ``yaml.safe_load`` + a schema library:

* **yaml-cpp semantics, not YAML 1.1/1.2 resolution.** The original reads every scalar as
  text and converts it per field (protocol §2.1): ``id: 0012`` is the string ``"0012"``, a bool is
  one of ``y n yes no true false on off`` in three case styles (:mod:`asyncmigfra.values`),
  unsigned integers use C++ base auto-detection (``0x1F`` hex, ``017`` octal). A resolving
  loader would already have lost that information, so we compose a *node graph* (text +
  "was it a plain null" + mark) and convert each field ourselves.
* **Wire-compatible error texts.** Schedulers match on the original's ``details`` prefixes
  (protocol §4.7), e.g. ``Exception while parsing message: yaml-cpp: error at line L, column C: bad
  conversion``. We keep those prefixes and append what was wrong in parentheses.
* **Hostile input.** A task topic is writable by anyone on the broker. Size, node count
  (aliases expanded: "billion laughs") and nesting depth are bounded, every failure becomes
  :class:`~asyncmigfra.errors.TaskRejected`, and nothing here recurses on the input's nesting
  without a bound (so 100k ``[`` cannot raise ``RecursionError``).
* **Speed.** ruamel.yaml's pure-Python parser needs about 1.2 ms for a 300-byte message, more
  than half of the agent's 2 ms budget per task. A small line-based *fast path* reads the
  block-style subset that schedulers actually send (block maps/sequences, one-line flow
  sequences, one-line plain and quoted scalars, comments, ``---``/``...``) in a few tens of
  microseconds. Anything outside that subset (anchors, tags, block scalars, flow maps,
  multi-line scalars, tabs, non-ASCII, ...) and every malformed document goes to ruamel.yaml,
  which is the reference: the fast path must return either ``None`` or exactly the node graph
  the ruamel path returns (a property test compares them).

Only the first YAML document is read (like ``YAML::Load``); later documents are never
parsed. Duplicate keys are not an error: the first occurrence wins (what yaml-cpp's
``node["key"]`` returns). Unknown keys are ignored everywhere.

Deliberate differences from the original (every message it accepted with a sane meaning is
still accepted with the same meaning):

* negative unsigned integers (which C++ wraps to ``2**32 - n``) and values over a field's
  range are bad conversions; so are an unknown ``migration-type`` (the original logged it and
  migrated warm) and a malformed ``pscom-hook-procs`` (the original failed at run time);
* a bad-conversion ``details`` ends with ``(<path>: <expected>, <found>)``; the original's
  prefix is kept, so matching on it still works;
* the ``id`` is returned with every rejection whenever it could be read;
* a start item's name from ``xml`` is the first ``<name>`` matched non-greedily, stripped and
  entity-unescaped; when there is none the name is ``""`` (not the whole XML);
* recursive aliases are rejected (yaml-cpp builds a cyclic node).

This package is pure: no I/O, no logging, no global mutable state except a per-thread cached
ruamel.yaml instance.

The package re-exports the public names; the code lives in:

- :mod:`~asyncmigfra.wire.parsing.nodes`: the node graph, limits, rejection texts, the ruamel.yaml
  composer (slow path);
- :mod:`~asyncmigfra.wire.parsing.fastpath`: the line-based fast path and ``_compose``;
- :mod:`~asyncmigfra.wire.parsing.names`: what ids, VM names, hosts, drivers, transports and
  disk targets may be;
- :mod:`~asyncmigfra.wire.parsing.fields`: field converters (yaml-cpp scalar rules), ``_Fields``;
- :mod:`~asyncmigfra.wire.parsing.migration`: the builders of ``migrate vm``, ``evacuate node``
  (their ``parameter:`` map, checked against :mod:`asyncmigfra.streamoptions`) and
  ``tune migration``;
- :mod:`~asyncmigfra.wire.parsing.tasks`: the other task builders, ``parse_task`` and
  ``load_yaml``.
"""

from asyncmigfra.wire.parsing.fields import UINT32_MAX as UINT32_MAX
from asyncmigfra.wire.parsing.fields import UINT64_MAX as UINT64_MAX
from asyncmigfra.wire.parsing.names import MAX_MIGRATE_DISKS as MAX_MIGRATE_DISKS
from asyncmigfra.wire.parsing.names import MAX_TASK_ID as MAX_TASK_ID
from asyncmigfra.wire.parsing.names import TRANSPORTS as TRANSPORTS
from asyncmigfra.wire.parsing.names import valid_disk_target as valid_disk_target
from asyncmigfra.wire.parsing.names import valid_task_id as valid_task_id
from asyncmigfra.wire.parsing.names import valid_vm_name as valid_vm_name
from asyncmigfra.wire.parsing.nodes import DEFAULT_MAX_DEPTH, DEFAULT_MAX_NODES, DEFAULT_MAX_SIZE
from asyncmigfra.wire.parsing.tasks import load_yaml, parse_task

# ``X as X``: module-level names outside ``__all__`` that other modules import from here.
__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_NODES",
    "DEFAULT_MAX_SIZE",
    "load_yaml",
    "parse_task",
]
