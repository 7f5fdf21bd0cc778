"""Column names and explicit Arrow schemas: the one place they are spelled.

Rows travel through the job as one table shape (the request columns below, plus the
input's pass-through columns). A row is an error row exactly when ``error_stage`` is set;
the sink splits the stream into the images table and the errors table at write time.
"""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.spec.config import ROW_PARAMETERS, InputConfig

# Identity and parameters: decided by validation.
REQUEST_ID = "request_id"
ID = "id"
SOURCE = "source"
ROW_INDEX = "row_index"
IMAGE_INDEX = "image_index"
PROMPT = "prompt"
NEGATIVE_PROMPT = "negative_prompt"
SEED = "seed"
WIDTH = "width"
HEIGHT = "height"
STEPS = "steps"
GUIDANCE_SCALE = "guidance_scale"
SCHEDULER = "scheduler"
MAX_SEQUENCE_LENGTH = "max_sequence_length"
MODEL = "model"  # the model's name in the spec (its ref when the spec has one model)
MODEL_FINGERPRINT = "model_fingerprint"
MODEL_FAMILY = "model_family"
PIPELINE_CLASS = "pipeline_class"
DTYPE = "dtype"  # the precision the model ran in (model.dtype resolved: float32, float16, bfloat16)
DEVICE = "device"  # the device class it ran on (cpu, cuda)
LORA = "lora"  # the adapter's name in the spec's loras; null without one
LORA_SCALE = "lora_scale"
LORA_DIGEST = "lora_digest"

# Failure, set by whichever stage rejected the row.
ERROR_STAGE = "error_stage"
ERROR_TYPE = "error_type"
ERROR_MESSAGE = "error_message"
RAW = "raw"

# Generation.
GENERATION_SECONDS = "generation_seconds"
PROMPT_TOKENS = "prompt_tokens"
PROMPT_TRUNCATED = "prompt_truncated"
ACTOR_ID = "actor_id"
NODE_ID = "node_id"

# Encoding and writing.
IMAGE = "image"
IMAGE_FORMAT = "image_format"
SHA256 = "sha256"
RUN_ID = "run_id"

# Quality: what came out, for filtering. Never part of a request id (a score or a hash says
# nothing about how an image was asked for); null where not computed.
NSFW_DETECTED = "nsfw_detected"  # the model's safety checker flagged the image; null: no checker run
CLIP_SCORE = "clip_score"  # 100 x cosine(CLIP image, CLIP prompt); null without a scoring section
CLIP_PROMPT_TRUNCATED = "clip_prompt_truncated"  # the prompt was cut to the scorer's 77 tokens
CLIP_SCORER = "clip_scorer"  # the scorer's fingerprint: scores of two scorers do not compare
PHASH = "phash"  # 64-bit DCT perceptual hash (imagehash.phash), for near-duplicates
# The error type of a row rejected because its id repeats an earlier row's: its identity
# is that other row's, so it is told apart by its position (see pipeline.storage.supersede).
ERROR_TYPE_DUPLICATE_ID = "DuplicateId"

# Where rows are rejected.
STAGE_READ = "read"
STAGE_VALIDATE = "validate"
STAGE_GENERATE = "generate"
STAGE_ENCODE = "encode"

# Columns the reader adds to every input row: the row's identity when no id column is given.
INPUT_SOURCE = "__source"
INPUT_ROW = "__row"
# Added where rows are identified by content (pipeline.spec.occurrences): the row's content
# digest and its occurrence among identical rows in table order.
INPUT_CONTENT = "__content"
INPUT_OCCURRENCE = "__occurrence"
# Set by the reader on a row it could not parse (a bad JSONL line): the validator makes it an error row.
READ_ERROR = "__read_error"
# With READ_ERROR where the reader has no columns for the row: the text it could not parse
# (a JSONL line), kept as the error row's raw and never passed through as a column.
READ_TEXT = "__read_text"

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# Which image of which input row: shared by the images and errors tables.
IDENTITY_FIELDS = [
    pa.field(REQUEST_ID, pa.string()),
    pa.field(ID, pa.string()),
    pa.field(SOURCE, pa.string()),
    pa.field(ROW_INDEX, pa.int64()),
    pa.field(IMAGE_INDEX, pa.int32()),
]

REQUEST_FIELDS = [
    *IDENTITY_FIELDS,
    pa.field(PROMPT, pa.string()),
    pa.field(NEGATIVE_PROMPT, pa.string()),
    pa.field(SEED, pa.int64()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
    pa.field(STEPS, pa.int32()),
    pa.field(GUIDANCE_SCALE, pa.float64()),
    pa.field(MAX_SEQUENCE_LENGTH, pa.int32()),
    pa.field(SCHEDULER, pa.string()),
    pa.field(MODEL, pa.string()),
    pa.field(MODEL_FINGERPRINT, pa.string()),
    pa.field(MODEL_FAMILY, pa.string()),
    pa.field(PIPELINE_CLASS, pa.string()),
    pa.field(DTYPE, pa.string()),
    pa.field(DEVICE, pa.string()),
    pa.field(LORA, pa.string()),
    pa.field(LORA_SCALE, pa.float64()),
    pa.field(LORA_DIGEST, pa.string()),
]

ERROR_FIELDS = [
    pa.field(ERROR_STAGE, pa.string()),
    pa.field(ERROR_TYPE, pa.string()),
    pa.field(ERROR_MESSAGE, pa.string()),
    pa.field(RAW, pa.string()),
]

GENERATION_FIELDS = [
    pa.field(GENERATION_SECONDS, pa.float64()),
    pa.field(PROMPT_TOKENS, pa.int32()),
    pa.field(PROMPT_TRUNCATED, pa.bool_()),
    pa.field(ACTOR_ID, pa.string()),
    pa.field(NODE_ID, pa.string()),
]

ENCODE_FIELDS = [
    pa.field(IMAGE, IMAGE_TYPE),
    pa.field(IMAGE_FORMAT, pa.string()),
    pa.field(SHA256, pa.string()),
]

QUALITY_FIELDS = [
    pa.field(NSFW_DETECTED, pa.bool_()),
    pa.field(CLIP_SCORE, pa.float64()),
    pa.field(CLIP_PROMPT_TRUNCATED, pa.bool_()),
    pa.field(CLIP_SCORER, pa.string()),
    pa.field(PHASH, pa.uint64()),
]

# What a reader finds in images/: the request, how it was made, and the image itself.
IMAGES_FIELDS = [
    *REQUEST_FIELDS,
    *ENCODE_FIELDS,
    *GENERATION_FIELDS,
    *QUALITY_FIELDS,
    pa.field(RUN_ID, pa.string()),
]

ERRORS_FIELDS = [
    *IDENTITY_FIELDS,
    *ERROR_FIELDS,
    pa.field(RUN_ID, pa.string()),
]

RESERVED_NAMES = frozenset(
    f.name for f in [*REQUEST_FIELDS, *ERROR_FIELDS, *GENERATION_FIELDS, *ENCODE_FIELDS, *QUALITY_FIELDS, pa.field(RUN_ID, pa.string())]
) | {INPUT_SOURCE, INPUT_ROW, INPUT_CONTENT, INPUT_OCCURRENCE}

# Hugging Face `datasets` reads features from this schema metadata key; columns it does not
# name are typed from Arrow, so naming the image column is enough for PIL images on load.
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {IMAGE: {"_type": "Image"}}}}).encode()}


def passthrough_columns(inp: InputConfig, column_names: list[str]) -> list[str]:
    """The one rule for which input columns are carried to the output as they are: all
    but the prompt, the id, the parameter columns and the reader's own (a pandas index
    never gets here: the reader drops it)."""
    consumed = {inp.prompt_column, INPUT_SOURCE, INPUT_ROW, INPUT_CONTENT, INPUT_OCCURRENCE, READ_ERROR, READ_TEXT}
    consumed |= {inp.column_for(p) for p in ROW_PARAMETERS}
    if inp.id_column:
        consumed.add(inp.id_column)
    return [c for c in column_names if c not in consumed]


def passthrough_name(column: str) -> str:
    """The output name of an input column that is passed through: its own, unless it
    collides with a column this package writes, then prefixed with ``input_``."""
    return f"input_{column}" if column in RESERVED_NAMES else column


def images_schema(passthrough: list[pa.Field]) -> pa.Schema:
    """The images table: fixed columns, then the input's pass-through columns."""
    return pa.schema([*IMAGES_FIELDS, *passthrough], metadata=HF_METADATA)


ERRORS_SCHEMA = pa.schema(ERRORS_FIELDS)
