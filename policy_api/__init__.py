"""The composition root: wires the numeric packages (rankers, allocator, bandits) into a product.

Rooms, by role (arrows point one way: cli/demo -> serving -> jobs -> engine -> registry -> log -> core):

- :mod:`policy_api.log` — the SQL schema and engine factory, row reads/writes, the batched writer and
  its spill, the log as arrays, Parquet export, catalog files;
- :mod:`policy_api.registry` — configs, plans and models: typed records, one publish rule;
- :mod:`policy_api.engine` — one decision (rankers -> candidates -> prices -> bandit -> draw) and the
  engine state built from what is published;
- :mod:`policy_api.jobs` — plan, pace, learn, train, replay, import, valuation: plain functions;
- :mod:`policy_api.reports` — HTML/PNG reports;
- :mod:`policy_api.serving` — the Flask app, routes, schemas, metrics, runtime, gunicorn;
- :mod:`policy_api.cli` and :mod:`policy_api.demo` — the ``homepage`` command and the closed-loop demo;
- :mod:`policy_api.errors` and :mod:`policy_api.settings` — shared by every room.

``docs/architecture.md`` has the data flow of a request and of each job.
"""

from .errors import HomepageError

__all__ = ["HomepageError"]
