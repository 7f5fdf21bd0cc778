"""The batch job on Ray: the only place stages are chained and resources attached.

:mod:`.run` runs a spec to completion; :mod:`.read` the read + validate operators;
:mod:`.actors` the engine actors and their resources; :mod:`.datasink` the write side and
the output's preparation; :mod:`.connect` joining the cluster; :mod:`.progress` the
counter and progress line; :mod:`.summary` what a run did; :mod:`.plan` ``imagegen
validate``'s plan (rows, GPU-hours, cost) before any work.

May import every layer below (spec, storage, engine, output). Imports Ray.
"""
