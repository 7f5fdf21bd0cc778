"""Tools over a finished (or running) output dataset: ``imagegen verify`` (:mod:`.verify`:
every input row in exactly one place), ``imagegen report`` (:mod:`.report`: an HTML page
with a contact sheet; :mod:`.score_section` its clip_score and safety sections), ``imagegen
inspect`` (:mod:`.inspect`; :mod:`.duplicates` exact and near duplicates), and the Hugging
Face dataset card written after each run (:mod:`.card`).

May import :mod:`pipeline.spec`, :mod:`pipeline.storage`, :mod:`pipeline.engine` (to
resolve a spec's models for ``verify --input``) and :mod:`pipeline.errors`. Never imports Ray.
"""
