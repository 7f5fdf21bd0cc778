"""imagegen: batch image generation on Ray with diffusers.

The package is split into pure modules (no Ray import: config, schema, validate,
batching, encode, sink, storage, tables, model_ref, models, engine, and what users see:
progress, plan, report, card, inspect_output) and the two places that wire them to Ray:
``batch`` (Ray Data) and ``serve`` (Ray Serve).
"""

__version__ = "0.1.0"
