"""The online front: the batch job's engine behind an OpenAI-shaped images API on Ray Serve.

:mod:`.http_api` turns bodies into the raw rows the batch job would read (then the same
validator) and rows into response items, without Serve; :mod:`.app` is the deployment,
its replicas (the batch job's engine actor class) and ``imagegen serve``.

May import every layer below and :mod:`pipeline.job` (the engine actor and cluster
connection it shares with the batch job). Imports Ray.
"""
