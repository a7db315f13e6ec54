"""Optional integrations, each behind its own extra (``pip install holysheep_lb[redis]``).

- :mod:`holysheep_lb.contrib.redis`: breakers, rate limits and budgets shared by many
  processes on Redis.
- :mod:`holysheep_lb.contrib.prometheus`: a Prometheus collector that reads a client's
  state at scrape time (``pip install holysheep_lb[prometheus]``).
- :mod:`holysheep_lb.contrib.otel`: OpenTelemetry spans and metrics after the GenAI
  semantic conventions, ``instrument(client)`` (``pip install holysheep_lb[otel]``).
"""
