"""The batch job on Ray: the only place stages are chained and resources attached.

:mod:`.run` runs a spec to completion; :mod:`.reading` the read + validate tasks and the
id registry; :mod:`.engine_actors` the engine actors and their resources; :mod:`.dispatch`
the driver's bounded loop (blocks to actors, a lost actor's block to another, parts to
writers); :mod:`.output_tasks` the write side and the output's preparation;
:mod:`.shared_skip_filter` the skip filter in the object store; :mod:`.connect` joining the cluster; :mod:`.progress` the
counter and progress line; :mod:`.summary` what a run did; :mod:`.plan` ``imagegen
validate``'s plan (rows, GPU-hours, cost) before any work.

May import every layer below (spec, storage, engine, output). Imports Ray.
"""
