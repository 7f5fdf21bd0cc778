"""Quality columns' cost per image against generation: CLIP scoring and the perceptual hash.

One process, no Ray: the engine generates ``--images`` real prompts (PartiPrompts) in
diffusers calls of ``--call`` images; the scorer scores each call's images (as an engine
actor does, on its encoder's threads: timed here alone); the encoder PNG-encodes and
hashes each image. Reported: seconds per image for each, and the scorer's and the hash's
cost as a share of generation's. Each figure is the median of ``--repeats`` passes.

On CPU with the tiny models this measures the code path, not a real scorer: the tiny
CLIP is ~0.1M parameters, CLIP ViT-L/14 is 428M. On a GPU pass ``--model`` and
``--scorer`` (a hub id or folder of each) and ``--device cuda``:

    .venv/bin/python benchmarks/scoring_cost.py --images 64 --call 8 --size 64 --steps 4
    .venv/bin/python benchmarks/scoring_cost.py --device cuda --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --scorer openai/clip-vit-large-patch14 --images 256 --call 16 --size 512 --steps 25
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PARTI = REPO / "tests" / "data" / "prompts" / "partiprompts" / "PartiPrompts.tsv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--scorer", default="tiny-clip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--call", type=int, default=8, help="images per diffusers call (and per scorer call)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an engine actor's CPU share)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "imagegen-bench-cache"))
    args = parser.parse_args()

    import torch

    from pipeline.engine.image_encoding import encode_image
    from pipeline.engine.perceptual_hash import phash64
    from pipeline.engine.engine import Engine
    from pipeline.engine.requests import GenerationRequest
    from pipeline.engine.clip_scorer import ClipScorer, scorer_fingerprint
    from pipeline.spec.model_config import ModelConfig, ScoringConfig

    torch.set_num_threads(args.threads)
    lines = PARTI.read_text(encoding="utf-8").splitlines()[1:]
    prompts = [lines[i % len(lines)].split("\t")[0] for i in range(args.images)]
    requests = [GenerationRequest(p, "", i, args.size, args.size, args.steps, 7.5) for i, p in enumerate(prompts)]
    engine = Engine(ModelConfig(ref=args.model, cache_dir=args.cache, device=args.device, engine={"max_batch_pixels": args.call * args.size**2}))
    config = ScoringConfig(ref=args.scorer, cache_dir=args.cache)
    scorer = ClipScorer(config, engine.device, scorer_fingerprint(config))
    engine.generate(requests[: args.call])  # warm-up: first-call allocations
    scorer.score([r.pixels for r in engine.generate(requests[:1])], prompts[:1])

    generate, score, encode, phash = [], [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        results = engine.generate(requests)
        generate.append((time.perf_counter() - started) / args.images)
        images = [r.pixels for r in results]
        started = time.perf_counter()
        for k in range(0, args.images, args.call):
            scorer.score(images[k : k + args.call], prompts[k : k + args.call])
        if engine.device == "cuda":
            torch.cuda.synchronize()
        score.append((time.perf_counter() - started) / args.images)
        started = time.perf_counter()
        for image in images:
            encode_image(image, "png")
        encode.append((time.perf_counter() - started) / args.images)
        started = time.perf_counter()
        for image in images:
            phash64(image)
        phash.append((time.perf_counter() - started) / args.images)

    g, s, e, h = (statistics.median(x) for x in (generate, score, encode, phash))
    print(f"{args.model} {args.size}x{args.size}, {args.steps} steps, calls of {args.call}, {args.images} images, {args.device}, {args.threads} torch thread(s)")
    print("| per image | ms | share of generation |")
    print("|---|---|---|")
    print(f"| generation ({args.model}) | {1000 * g:.2f} | 100% |")
    print(f"| CLIP score ({args.scorer}) | {1000 * s:.2f} | {s / g:.1%} |")
    print(f"| PNG encode | {1000 * e:.2f} | {e / g:.1%} |")
    print(f"| phash | {1000 * h:.2f} | {h / g:.1%} |")


if __name__ == "__main__":
    main()
