"""The materialization job: PostgreSQL -> Redis, latest row per entity, guarded writes.

Run it as `featurestore-materialize incremental` (see `materialize/__main__.py`), or
from Python with `materialize.job.run(Settings(...))`.
"""
