"""The online front: the batch job's engine behind an OpenAI-shaped images API on Ray Serve.

:mod:`.http_api` turns bodies (every field of OpenAI's ``images.generate``) into the raw
rows the batch job would read (then the same validator) and rows into response items,
without Serve; :mod:`.app` is the deployment and its replicas (the batch job's engines);
:mod:`.auth` the API keys; :mod:`.drain` the app-wide "stop taking requests" of a graceful
shutdown; :mod:`.process` ``imagegen serve`` itself (supervisor, signals, drain, exit).

May import every layer below and :mod:`pipeline.batch` (the engine actor and cluster
connection it shares with the batch job). Imports Ray.
"""


def __getattr__(name: str):
    # `pipeline.serve:app_builder` is the import path users' Serve configs and the RayService
    # manifest name: kept working without importing Ray for those who only read this package.
    if name == "app_builder":
        from pipeline.serve.app import app_builder

        return app_builder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
