"""Configured pre/post hooks (``hooks:`` in the configuration): commands and MQTT requests.

A hook runs at one or more points of a task (:data:`HOOK_POINTS`). :meth:`HookRunner.run`
runs every configured hook of a point in the configured order, each as a ``phase`` event
``hook:<name>`` timed under the tag ``hook-<name>``. A hook that fails with policy ``fail``
raises :class:`asyncmigfra.errors.HookFailed` (the hooks after it do not run); with policy
``warn`` the failure is logged and returned, and the next hook runs.

**Command hooks** run in a session (and process group) of their own, stdin ``/dev/null``,
with the task's data in ``ASYNCMIGFRA_*`` environment variables. Only the last 4 KiB of
stdout and of stderr are kept. On a timeout or a cancellation the whole process group gets
SIGTERM, then SIGKILL 2 s later, so nothing the hook started outlives it.

The command's environment is the agent's without its secrets (:func:`hook_base_environment`):
no variable named in :data:`SECRET_VARIABLES`, none holding the MQTT password (so neither
``communicator.password-env``'s variable nor a copy of it), none of the ``ASYNCMIGFRA_*``
names the runner sets itself.

**MQTT hooks** publish a JSON request with a fresh ``request-id`` and wait for the answer
with that id on the response topic (``status: success`` or ``status: error``), through the
same :class:`asyncmigfra.peers.bus.MessageBus` as the pscom hook
(:func:`asyncmigfra.peers.exchange.request`).

**Command hooks on the destination** (``on: destination``) are run by the destination's agent:
the request goes to ``<prefix>/<dest>/hook/<source>`` and the answer comes back on
``<prefix>/<source>/hook-response/<dest>`` (:class:`asyncmigfra.peers.bus.PeerTopics`: the sender
is the last level, which the broker's ACL pins to its user name). The serving agent takes the
source from the topic, checks every field (:func:`parse_peer_request`) and runs only a hook
of its own configuration (:func:`asyncmigfra.peers.exchange.serve`).

Built-in hooks (``builtin: reduce-memory``) are only looked up here (:meth:`HookRunner.builtin`);
the migration engine implements them.

The package re-exports the public names; the code lives in:

- :mod:`~asyncmigfra.peers.userhooks.call`: :class:`HookCall`, the host a hook is about, a hook's
  failure;
- :mod:`~asyncmigfra.peers.userhooks.environment`: a command's environment, without the secrets;
- :mod:`~asyncmigfra.peers.userhooks.commands`: running a command hook (spawn, process group,
  cancellation, output bounds);
- :mod:`~asyncmigfra.peers.userhooks.remote`: MQTT hooks and the requests between agents for
  ``on: destination`` command hooks;
- :mod:`~asyncmigfra.peers.userhooks.runner`: :class:`HookRunner`.
"""

from asyncmigfra.peers.userhooks.call import MAX_REASON_CHARS as MAX_REASON_CHARS
from asyncmigfra.peers.userhooks.call import HookCall as HookCall
from asyncmigfra.peers.userhooks.commands import DRAIN_GRACE as DRAIN_GRACE
from asyncmigfra.peers.userhooks.commands import KILL_GRACE as KILL_GRACE
from asyncmigfra.peers.userhooks.commands import OUTPUT_TAIL_BYTES as OUTPUT_TAIL_BYTES
from asyncmigfra.peers.userhooks.commands import SPAWN_LIMIT as SPAWN_LIMIT
from asyncmigfra.peers.userhooks.environment import SECRET_VARIABLES as SECRET_VARIABLES
from asyncmigfra.peers.userhooks.environment import hook_base_environment as hook_base_environment
from asyncmigfra.peers.userhooks.environment import hook_environment as hook_environment
from asyncmigfra.peers.userhooks.remote import MAX_PEER_DETAILS as MAX_PEER_DETAILS
from asyncmigfra.peers.userhooks.remote import MAX_PEER_KEYS as MAX_PEER_KEYS
from asyncmigfra.peers.userhooks.remote import MAX_PEER_REQUEST_BYTES as MAX_PEER_REQUEST_BYTES
from asyncmigfra.peers.userhooks.remote import MAX_PEER_VALUE as MAX_PEER_VALUE
from asyncmigfra.peers.userhooks.remote import MAX_RESPONSE_BYTES as MAX_RESPONSE_BYTES
from asyncmigfra.peers.userhooks.remote import PEER_CONCURRENCY as PEER_CONCURRENCY
from asyncmigfra.peers.userhooks.remote import (
    PEER_CONCURRENCY_PER_SOURCE as PEER_CONCURRENCY_PER_SOURCE,
)
from asyncmigfra.peers.userhooks.remote import PEER_MARGIN as PEER_MARGIN
from asyncmigfra.peers.userhooks.remote import PeerHookRequest as PeerHookRequest
from asyncmigfra.peers.userhooks.remote import hook_request as hook_request
from asyncmigfra.peers.userhooks.remote import hook_topic_of as hook_topic_of
from asyncmigfra.peers.userhooks.remote import hook_topics as hook_topics
from asyncmigfra.peers.userhooks.remote import parse_peer_request as parse_peer_request
from asyncmigfra.peers.userhooks.runner import HookRunner as HookRunner
from asyncmigfra.settings import HOOK_POINTS as HOOK_POINTS

__all__ = [
    "HOOK_POINTS",
    "SECRET_VARIABLES",
    "HookCall",
    "HookRunner",
    "PeerHookRequest",
    "hook_base_environment",
    "hook_environment",
    "hook_request",
    "hook_topics",
    "parse_peer_request",
]
