"""Data pipeline at scale: tokenizing N chat pairs, its peak memory, and the cached reload.

    .venv/bin/python scripts/bench_data_scale.py                      # 100,000 pairs
    .venv/bin/python scripts/bench_data_scale.py --pairs 20000 --num_proc 2

Writes N synthetic conversational pairs (a system turn sometimes, a user prompt, one assistant
answer each for chosen and rejected, words drawn from a fixed list, log-normal lengths) as jsonl
into a temporary directory, then runs `jaxrm.data.build_datasets` twice with the shipped tiny
tokenizer (jaxrm/assets/tiny-llama) and a cache in that directory: first tokenizing (a cache
miss), then reading the cache (a hit), each in a fresh process so that each has its own peak RSS
(`resource.getrusage`, which includes the process's imports). Timed inside each process:
loading the tokenizer (mostly transformers' imports), then `build_datasets` (with the vocabulary
and packed-row checks that training runs); the process's wall time (imports included) too.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = (
    "the a of to and in is it that for you on with as this was are be at or by from not have "
    "but what all can we when your which there their if do will each how about up out them "
    "then she many some so these would other into has more her two like him see time could no "
    "make than first been its who now people my made over did down only way find use may "
    "water long little very after words called just where most know get through back much go "
    "good new write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why things "
    "help put years different away again off went old number great tell men say small every "
    "found still between name should home big give air line set own under read last never us "
    "left end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house world going want school important until form "
    "food keep children feet land side without boy once animals life enough took sometimes "
    "four head above kind began almost live page got earth need far hand high year mother light "
    "parts country father let night following picture being study second eyes soon times story"
).split()


def sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=max(1, words))).capitalize() + "."


def lognormal(rng: np.random.Generator, median: float) -> int:
    return int(np.exp(rng.normal(np.log(median), 0.7)))


def chat_pair(rng: np.random.Generator) -> dict:
    prompt = [{"role": "user", "content": sentence(rng, lognormal(rng, 40))}]
    if rng.random() < 0.3:
        prompt.insert(0, {"role": "system", "content": sentence(rng, lognormal(rng, 12))})

    def answer() -> list[dict]:
        return [*prompt, {"role": "assistant", "content": sentence(rng, lognormal(rng, 80))}]

    return {"chosen": answer(), "rejected": answer()}


def write_pairs(path: Path, pairs: int, seed: int) -> None:
    """Streams the rows to disk (the generator holds one pair at a time)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(pairs):
            f.write(json.dumps(chat_pair(rng)) + "\n")


def build_once(data: str, cache: str, num_proc: int, max_token_length: int) -> dict:
    """One `build_datasets` as training runs it (in this process, with the vocabulary and
    packed-row checks): the seconds of loading the tokenizer (mostly transformers' imports) and
    of `build_datasets`, pairs, tokens, peak RSS in MiB, whether the cache was hit; and the
    seconds of the data checks alone on the result, with rows of 512 tokens so that the longer
    pairs' shared prefixes are measured too."""
    from jaxrm.assets import TINY_MODEL_DIR
    from jaxrm.data import PackFit, build_datasets, packing
    from jaxrm.data.checks import first_out_of_vocab, identical_pairs, oversized_pairs
    from jaxrm.tokenizer import load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(str(TINY_MODEL_DIR))
    loaded = time.perf_counter()
    train, _, stats = build_datasets(
        dataset_mixer_list=[data, "1.0"],
        tokenizer=tokenizer,
        max_token_length=max_token_length,
        max_prompt_token_length=max_token_length,
        seed=1,
        cache_dir=cache,
        num_proc=num_proc or None,
        vocab_size=len(tokenizer),
        pack=PackFit(packing.default_length(max_token_length), share_prefix=True),
    )
    built = time.perf_counter()
    first_out_of_vocab(train, len(tokenizer))
    identical_pairs(train)
    oversized_pairs(train, PackFit(512, share_prefix=True))
    checks = time.perf_counter() - built
    tokens = int(train.chosen.lengths().sum() + train.rejected.lengths().sum())
    return {
        "tokenizer_seconds": round(loaded - started, 2),
        "build_seconds": round(built - loaded, 2),
        "checks_seconds": round(checks, 2),
        "pairs": len(train),
        "pairs_per_second": round(len(train) / (built - loaded)),
        "tokens_per_pair": round(tokens / max(1, len(train)), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cache_hit": stats["train"]["sources"][0]["cache_hit"],
    }


def run_phase(args: argparse.Namespace, data: Path, cache: Path) -> dict:
    """`build_once` in a fresh process; adds its wall time including imports."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--phase", str(data), str(cache)]
    command += ["--num_proc", str(args.num_proc), "--max_token_length", str(args.max_token_length)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"phase failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - started, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--num_proc", type=int, default=0, help="tokenizing processes (0: one)")
    parser.add_argument("--max_token_length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phase", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(build_once(*args.phase, args.num_proc, args.max_token_length)))
        return
    with tempfile.TemporaryDirectory(prefix="jaxrm-bench-data-") as tmp:
        data, cache = Path(tmp) / "pairs.jsonl", Path(tmp) / "cache"
        started = time.perf_counter()
        write_pairs(data, args.pairs, args.seed)
        written = time.perf_counter() - started
        size = data.stat().st_size / 2**20
        print(f"wrote {args.pairs:,} pairs ({size:.0f} MiB) in {written:.1f}s")
        tokenized = run_phase(args, data, cache)
        cached = run_phase(args, data, cache)
    assert not tokenized["cache_hit"] and cached["cache_hit"]
    for name, r in (("tokenize", tokenized), ("cached reload", cached)):
        print(
            f"{name:14s} build_datasets {r['build_seconds']:.1f}s ({r['pairs_per_second']:,} "
            f"pairs/s), tokenizer load {r['tokenizer_seconds']:.1f}s, process "
            f"{r['process_seconds']:.1f}s; peak RSS {r['peak_rss_mib']:,} MiB; data checks "
            f"{r['checks_seconds']:.2f}s"
        )
    print(f"{tokenized['tokens_per_pair']} tokens per pair (chosen + rejected)")
    summary = {"pairs": args.pairs, "num_proc": args.num_proc, "tokenize": tokenized}
    summary["cached"] = cached
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
