"""The node's web side: /healthz, /metrics (Prometheus) and the admin console (issue 12)."""
