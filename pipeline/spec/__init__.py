"""The spec: what a job asks for, and the rules every row is held to.

The job spec's pydantic sections (:mod:`.config`, :mod:`.model_config`, :mod:`.serve_config`, :mod:`.section`)
and how a YAML file becomes one (:mod:`.load`); the output's column names and Arrow
schemas (:mod:`.schema`); which parameters and schedulers each model family takes
(:mod:`.families`); bucket keys and block sizes (:mod:`.bucketing`); the resolved models
and adapters as plain data (:mod:`.catalog`); and a raw row -> a request or an error row
(:mod:`.validate`: request ids, seeds, defaults).

Pure: no I/O but reading the spec file. May import :mod:`pipeline.errors` only (and
each other). Never imports Ray, torch or diffusers.
"""
