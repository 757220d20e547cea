"""Role: transport. The Prometheus exposition (``metrics.listen``, the ``metrics`` extra).

- :mod:`~asyncmigfra.transport.metrics.opening`: whether metrics are on, and a clear error
  when they are but ``prometheus_client`` is not installed (imports nothing else);
- :mod:`~asyncmigfra.transport.metrics.series`: the series, in a registry of their own;
- :mod:`~asyncmigfra.transport.metrics.feed`: the one boundary where events and results
  become metrics, and the once-a-second sample of the agent's vitals;
- :mod:`~asyncmigfra.transport.metrics.endpoint`: ``/metrics``, served from a thread.

The package re-exports nothing; import from the defining module.
"""
