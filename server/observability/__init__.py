"""Observability: Prometheus metrics (``/metrics``), request and event ids in structured logs,
and the node registry behind ``portalhub status``. See docs/architecture.md, Observability."""
