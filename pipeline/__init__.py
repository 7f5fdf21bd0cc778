"""imagegen: batch image generation on Ray with diffusers.

The package is layered; each layer imports only the ones above it in this list:

- :mod:`pipeline.errors`  - exception types every layer raises
- :mod:`pipeline.spec`    - the job spec and the row rules (pure)
- :mod:`pipeline.storage` - files, object stores, prompt tables, output parts, the lock
- :mod:`pipeline.engine`  - resident diffusers pipelines, the actor's block code
- :mod:`pipeline.output`  - verify, report, inspect, dataset card
- :mod:`pipeline.batch`, :mod:`pipeline.serve`, :mod:`pipeline.remote` - the Ray wiring:
  the batch job, the online front, the remote-cluster client
- :mod:`pipeline.cli`     - the ``imagegen`` command

Nothing above the Ray wiring imports Ray (tests/test_layout.py checks it). ARCHITECTURE.md
at the repository root is the map.
"""

__version__ = "0.1.0"
