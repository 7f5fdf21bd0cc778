"""Bytes in and out: the one door to files and object stores.

URL + options -> fsspec filesystem, atomic writes, listing (:mod:`.filesystem`); one
file's bytes -> raw rows per format (:mod:`.table_readers`; CSV and TSV :mod:`.delimited_readers`,
text a block at a time :mod:`.text_blocks`); a prompt table's files -> Arrow
rows numbered within their file (:mod:`.tables`); output parts and
manifests (:mod:`.part_files`); what is committed and what a rerun adopts (:mod:`.commit_protocol`; folding records, :mod:`.fold`; the
record format in :mod:`.record_format`, request ids as whole 16-byte keys in
:mod:`.skip_filter`); the output's lease against concurrent runs (:mod:`.lock`).

May import :mod:`pipeline.spec` and :mod:`pipeline.errors`. Never imports Ray, torch or
diffusers.
"""
