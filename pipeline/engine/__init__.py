"""The engine: resident diffusers pipelines turning requests into encoded images.

:mod:`.engine` holds one loaded pipeline and generates (one generator per image, failures
per row, out-of-memory halving); :mod:`.requests` is what it is asked and answers;
:mod:`.family_calls` each family's call conventions (encode-once); :mod:`.kernels` the
attention kernel, VAE chunks, compiling and its clock; :mod:`.compile_cache` compiled graphs
shared between engines; :mod:`.gpu_rates` the measured GPU rates and what follows from them
(``compile: auto``); :mod:`.resident_models` the in-memory LRU of loaded
engines per process; :mod:`.weight_sources` where weights come from (local, ``s3://``, hub, tiny) and
their fingerprint; :mod:`.resolve_catalog` resolving a spec's models and adapters into a
:class:`~pipeline.spec.catalog.Catalog` on the driver; :mod:`.adapters` LoRA files;
:mod:`.tiny_models` the random-weight models built offline for tests and the demo
(:mod:`.tiny_clip` the tiny CLIP scorer and safety checker); :mod:`.clip_scorer` the CLIP
scorer kept resident beside the pipelines (``clip_score``); :mod:`.image_encoding` pixels ->
PNG/WebP/JPEG bytes; :mod:`.perceptual_hash` the 64-bit pHash; :mod:`.table_generation` the code an engine actor
runs on a block (Arrow requests in, Arrow image and error rows out).

May import :mod:`pipeline.spec`, :mod:`pipeline.storage` and :mod:`pipeline.errors`.
Never imports Ray: the batch job's actors and the Serve replicas both wrap it, and it runs
(and is tested) without a cluster.
"""
