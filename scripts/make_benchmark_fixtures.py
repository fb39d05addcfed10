"""Regenerate the shipped benchmark fixtures under ``jaxrm/assets/benchmarks/``.

    python scripts/make_benchmark_fixtures.py

Writes, deterministically (fixed seed, no network), tiny stand-ins for the two benchmarks in their
exact schemas, so `python -m jaxrm.evaluate` and the tests run offline:

* ``rewardbench.jsonl``: the columns of ``allenai/reward-bench`` split ``filtered`` (``prompt``,
  ``chosen``, ``chosen_model``, ``rejected``, ``rejected_model``, ``subset``, ``id``), two or three
  rows for every one of its 23 subsets.
* ``rewardbench2.jsonl``: the columns of ``allenai/reward-bench-2`` split ``test`` (``id``,
  ``prompt``, ``chosen`` and ``rejected`` lists, ``num_correct``, ``num_incorrect``,
  ``total_completions``, ``models``, ``subset``, ``additional_metadata``): three best-of-4 rows
  (one chosen, three rejected) for each of the five plain subsets, and for Ties three prompts with
  several correct answers (``tied:<k>``) each paired with a one-answer prompt (``ref:<k>``).

The texts are the tasks of the tiny preference set (``scripts/make_tiny_assets.py``: name an item
of a category, recall a stated color, give an antonym), so the tiny model trained by
``scripts/train.sh`` can be judged on them; they say nothing about the real benchmarks' contents.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_tiny_assets as tiny  # noqa: E402

from jaxrm.rewardbench.rules import SUBSET_MAPPING, TIES, V2_SUBSETS  # noqa: E402

OUT_DIR = tiny.ASSETS / "benchmarks"
SEED = 2024
GENERATOR = "jaxrm-tiny-generator"


def task(rng: random.Random, n_wrong: int) -> tuple[str, str, list[str]]:
    """(prompt, correct answer, `n_wrong` distinct wrong answers), all in one response template."""
    kind = rng.choice(["category", "color", "opposite"])
    if kind == "category":
        c = rng.choice(tiny.CATS)
        prompt = rng.choice(tiny.CATEGORY_TEMPLATES).format(c=c)
        others = [w for o in tiny.CATS if o != c for w in tiny.CATEGORIES[o]]
        good, wrong = rng.choice(tiny.CATEGORIES[c]), rng.sample(others, n_wrong)
    elif kind == "color":
        o, c = rng.choice(tiny.OBJECTS), rng.choice(tiny.COLORS)
        prompt = rng.choice(tiny.COLOR_TEMPLATES).format(o=o, c=c)
        good, wrong = c, rng.sample([x for x in tiny.COLORS if x != c], n_wrong)
    else:
        x = rng.choice(tiny.ITEMS)
        prompt = rng.choice(tiny.OPPOSITE_TEMPLATES).format(x=x)
        pool = [tiny.OPPOSITE[y] for y in tiny.ITEMS if y not in (x, tiny.OPPOSITE[x])]
        good, wrong = tiny.OPPOSITE[x], rng.sample(pool, n_wrong)
    template = rng.choice(tiny.RESPONSE_TEMPLATES)
    return prompt, template.format(r=good), [template.format(r=w) for w in wrong]


def rewardbench_rows(rng: random.Random) -> list[dict]:
    rows = []
    for subsets in SUBSET_MAPPING.values():
        for subset in subsets:
            for _ in range(rng.choice([2, 3])):
                prompt, chosen, (rejected,) = task(rng, 1)
                rows.append(
                    {
                        "prompt": prompt,
                        "chosen": chosen,
                        "chosen_model": GENERATOR,
                        "rejected": rejected,
                        "rejected_model": GENERATOR,
                        "subset": subset,
                        "id": len(rows),
                    }
                )
    return rows


def v2_row(
    row_id: str, subset: str, prompt: str, chosen: list[str], rejected: list[str], kind: str
) -> dict:
    models = [GENERATOR] * (len(chosen) + len(rejected))
    return {
        "id": row_id,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "num_correct": len(chosen),
        "num_incorrect": len(rejected),
        "total_completions": len(chosen) + len(rejected),
        "models": models,
        "subset": subset,
        "additional_metadata": {
            "category": kind,
            "correct": chosen[0],
            "index": 0.0,  # the row's position, set by rewardbench2_rows
            "instruction_id_list": [],
            "label": "",
            "method": "jaxrm fixture",
            "models": models,
            "prompt_norm": prompt.lower(),
            "subcategory": "",
            "valid": 1.0,
        },
    }


def ties_rows(rng: random.Random, k: int) -> list[dict]:
    """Prompt `k`: "name one <category>" with several right answers, and a one-answer prompt."""
    c = rng.choice(tiny.CATS)
    template = rng.choice(tiny.RESPONSE_TEMPLATES)
    right = rng.sample(tiny.CATEGORIES[c], rng.choice([3, 4]))
    others = [w for o in tiny.CATS if o != c for w in tiny.CATEGORIES[o]]
    wrong = rng.sample(others, rng.choice([2, 3]))
    prompt = rng.choice(tiny.CATEGORY_TEMPLATES).format(c=c)
    tied = v2_row(
        f"tied:{k}",
        TIES,
        prompt,
        [template.format(r=w) for w in right],
        [template.format(r=w) for w in wrong],
        "tied",
    )
    ref_prompt, good, bad = task(rng, 3)
    return [tied, v2_row(f"ref:{k}", TIES, ref_prompt, [good], bad, "ref")]


def rewardbench2_rows(rng: random.Random) -> list[dict]:
    rows = []
    for subset in V2_SUBSETS:
        if subset == TIES:
            for k in range(3):
                rows += ties_rows(rng, k)
            continue
        for _ in range(3):
            prompt, chosen, rejected = task(rng, 3)
            rows.append(v2_row(str(len(rows)), subset, prompt, [chosen], rejected, subset))
    for i, row in enumerate(rows):
        row["additional_metadata"]["index"] = float(i)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(SEED)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    v1, v2 = rewardbench_rows(rng), rewardbench2_rows(rng)
    write_jsonl(OUT_DIR / "rewardbench.jsonl", v1)
    write_jsonl(OUT_DIR / "rewardbench2.jsonl", v2)
    print(f"wrote {len(v1)} RewardBench rows and {len(v2)} RewardBench 2 rows to {OUT_DIR}")


if __name__ == "__main__":
    main()
