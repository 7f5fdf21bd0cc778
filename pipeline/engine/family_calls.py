"""How each family's pipeline is called: the torch side of :mod:`pipeline.spec.families`.

The engine hands a uniform group of requests (one size, step count, guidance scale,
sequence length and adapter) to :func:`call_kwargs` and calls the pipeline with what it
returns. Two paths give the same images (within float rounding):

- **plain**: prompt strings, encoded by diffusers inside the call;
- **encode once**: each distinct prompt and negative prompt of the group goes through
  the text encoders once, and the call gets embeddings indexed back per row. A batch of
  one prompt with many seeds, or one negative prompt for all, costs one encoding.

Decisions that keep both paths, and every row, alike:

- An empty ``negative_prompt`` means "no negative prompt". For SD and SD3 diffusers
  encodes ``""`` for a missing negative prompt, so the two are the same. SDXL pipelines
  with ``force_zeros_for_empty_prompt`` (SDXL base) use zero embeddings instead; a row
  with ``""`` gets those zeros even when its neighbours have negative prompts, so an
  image never depends on its batch (diffusers' strings cannot say that per row, so such
  a mixed group passes negative embeddings on the plain path too).
- FLUX takes no negative prompt: guidance is embedded, and its ``true_cfg_scale`` stays
  at diffusers' default (off).
- Negative prompts are not encoded when guidance is 1 or less: diffusers ignores them.
- No ``lora_scale`` is passed to ``encode_prompt``: the engine sets adapter weights with
  ``set_adapters`` and diffusers' own calls pass a scale only from
  ``cross_attention_kwargs``/``joint_attention_kwargs``, which we leave unset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from pipeline.spec.families import Family

if TYPE_CHECKING:  # the engine imports this module
    from pipeline.engine.requests import GenerationRequest

# The tokenizer whose truncation bounds what a prompt can say: the longest one.
_PRIMARY_TOKENIZER = {"sd": "tokenizer", "sdxl": "tokenizer", "sd3": "tokenizer_3", "flux": "tokenizer_2"}


def call_kwargs(pipe, family: Family, batch: list[GenerationRequest], encode_once: bool) -> dict:
    """Keyword arguments for ``pipe(**kwargs, generator=..., output_type="np")`` for
    ``batch``, a uniform group (see :data:`pipeline.spec.bucketing.BUCKET_FIELDS`).

    With ``encode_once`` the texts come as embeddings, each distinct text encoded once
    (made under ``torch.inference_mode``: fit for the call, not for autograd); otherwise
    as strings. See the module docstring for how empty negative prompts and FLUX are
    handled.
    """
    first = batch[0]
    kwargs = {
        "width": first.width,
        "height": first.height,
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
    }
    length = sequence_length(family, first)
    if length is not None:
        kwargs["max_sequence_length"] = length
    if family.name == "sdxl":
        # diffusers' own default, spelled out: SDXL is conditioned on the size it makes.
        kwargs["original_size"] = kwargs["target_size"] = (first.height, first.width)
    prompts = [r.prompt for r in batch]
    if encode_once:
        kwargs.update(_embeddings(pipe, family, prompts, length))
    else:
        kwargs["prompt"] = prompts
    if "negative_prompt" in family.takes and first.guidance_scale > 1:
        kwargs.update(_negatives(pipe, family, [r.negative_prompt for r in batch], length, encode_once))
    return kwargs


def sequence_length(family: Family, request: GenerationRequest) -> Optional[int]:
    """T5 tokens for ``request``: its own ``max_sequence_length``, else the family's
    default; None for families without T5."""
    if family.max_sequence_length is None:
        return None
    return request.max_sequence_length or family.max_sequence_length


def prompt_tokens(pipe, family: Family, prompts: list[str]) -> list[int]:
    """Tokens each prompt takes in the family's primary (longest) text encoder, special
    tokens included, before truncation: CLIP for SD/SDXL, T5 for SD3/FLUX (CLIP when the
    pipeline was loaded without its T5)."""
    ids = _primary_tokenizer(pipe, family)(prompts, truncation=False, add_special_tokens=True)["input_ids"]
    return [len(x) for x in ids]


def token_limit(pipe, family: Family, request: GenerationRequest) -> int:
    """The token count beyond which :func:`prompt_tokens`' encoder truncates ``request``'s
    prompt: CLIP's ``model_max_length``, or T5's ``max_sequence_length``."""
    tokenizer = _primary_tokenizer(pipe, family)
    if tokenizer is pipe.tokenizer:
        return int(tokenizer.model_max_length)
    return sequence_length(family, request)


def _primary_tokenizer(pipe, family: Family):
    return getattr(pipe, _PRIMARY_TOKENIZER[family.name], None) or pipe.tokenizer


def _negatives(pipe, family: Family, negatives: list[str], length, encode_once: bool) -> dict:
    zeros_for_empty = bool(pipe.config.get("force_zeros_for_empty_prompt", False))
    if zeros_for_empty and not any(negatives):
        # diffusers' own no-negative-prompt call: it makes the zeros itself.
        return {}
    if encode_once or (zeros_for_empty and not all(negatives)):
        encoded = _embeddings(pipe, family, negatives, length)
        if zeros_for_empty:
            empty = [not text for text in negatives]
            encoded = {key: _zero_rows(value, empty) for key, value in encoded.items()}
        return {f"negative_{key}": value for key, value in encoded.items()}
    return {"negative_prompt": negatives}


def _zero_rows(tensor, rows: list[bool]):
    import torch

    mask = torch.tensor(rows, device=tensor.device).view(-1, *([1] * (tensor.dim() - 1)))
    return tensor.masked_fill(mask, 0)


def _embeddings(pipe, family: Family, texts: list[str], length) -> dict:
    """``prompt_embeds`` (and ``pooled_prompt_embeds``) for ``texts``, one row per text,
    each distinct text encoded once, with classifier-free guidance off."""
    import torch

    distinct = list(dict.fromkeys(texts))
    with torch.inference_mode():
        encoded = _ENCODERS[family.name](pipe, distinct, length)
    position = {text: i for i, text in enumerate(distinct)}
    rows = [position[text] for text in texts]
    return {key: value[rows] for key, value in encoded.items()}


def _encode_sd(pipe, texts: list[str], length) -> dict:
    embeds, _ = pipe.encode_prompt(texts, pipe.device, 1, False)
    return {"prompt_embeds": embeds}


def _encode_sdxl(pipe, texts: list[str], length) -> dict:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=texts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _encode_sd3(pipe, texts: list[str], length) -> dict:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=texts,
        prompt_2=None,
        prompt_3=None,
        device=pipe.device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        max_sequence_length=length,
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _encode_flux(pipe, texts: list[str], length) -> dict:
    # The third output, text ids, are zeros shaped by the sequence: the call remakes them.
    embeds, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=pipe.device, num_images_per_prompt=1, max_sequence_length=length)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


_ENCODERS: dict[str, Callable] = {"sd": _encode_sd, "sdxl": _encode_sdxl, "sd3": _encode_sd3, "flux": _encode_flux}
