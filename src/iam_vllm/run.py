"""``python -m iam_vllm.run MODEL``: one engine (``vllm.LLM``) over a batch of prompts, greedy, timed; prints JSON
with the tokens, the engine's KV capacity (tokens) and output tokens per second. The engine tier and the throughput
measurement in docs/serving.md run it, one process per model, so that each engine has the machine to itself."""

from __future__ import annotations

import argparse
import json
import random
import re
import time


def logged_capacity(log: str) -> int | None:
    """The KV capacity (tokens) an engine's log states ("KV cache size: N tokens"); ``None`` where it states none."""
    found = re.search(r"KV cache size: ([\d,]+) tokens", log)
    return int(found.group(1).replace(",", "")) if found else None


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m iam_vllm.run", description=__doc__)
    p.add_argument("model", help="an IAM folder (iam export-vllm) or any model folder vLLM serves")
    p.add_argument("--prompts", default=None, help="JSON list of token-id lists (default: --batch random prompts)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed generations, each of new prompts, after a short warm-up (0: one untimed generation)",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    args = p.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, seed=0, max_model_len=args.max_model_len)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)
    prompts = (
        json.loads(args.prompts)
        if args.prompts
        else [[rng.randrange(1, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.batch)]
    )
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    run = lambda batch, p=params: llm.generate([{"prompt_token_ids": ids} for ids in batch], p, use_tqdm=False)
    seconds = []
    if args.repeats:  # a short warm-up, then prompts the prefix cache has not seen
        run([ids[:16] for ids in prompts], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = run(prompts)
        seconds.append(time.perf_counter() - start)
        prompts = [[(t + 1) % vocab or 1 for t in ids] for ids in prompts]
    if not args.repeats:
        outputs = run(prompts)
    cache = llm.llm_engine.vllm_config.cache_config
    best = min(seconds, default=None)
    print(
        json.dumps(
            {
                "model": args.model,
                "tokens": [o.outputs[0].token_ids for o in outputs],
                "kv_blocks": cache.num_gpu_blocks,
                "block_size": cache.block_size,
                "seconds": seconds,
                "output_tokens_per_s": None if best is None else len(prompts) * args.new_tokens / best,
            }
        )
    )


if __name__ == "__main__":
    main()
