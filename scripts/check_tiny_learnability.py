"""Check that the tiny preference set is learnable by the tiny Llama (PyTorch, CPU, float32).

    python scripts/check_tiny_learnability.py [--steps 300] [--lr 2e-3] [--batch 32]
    python scripts/check_tiny_learnability.py --response-only   # must stay near 0.5

Loads ``jaxrm/assets/tiny-llama`` as ``LlamaForSequenceClassification(num_labels=1)`` and trains
it with the Bradley-Terry loss ``-logsigmoid(r_chosen - r_rejected)`` (reward read at the last
non-pad token, right padding), printing eval accuracy along the way. ``--response-only`` feeds
the model the assistant response alone (no prompt), which must not beat chance.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "jaxrm" / "assets" / "tiny-llama"
PREFS_DIR = ROOT / "jaxrm" / "assets" / "tiny-prefs"


def task_of(row: dict) -> str:
    q = row["chosen"][-2]["content"]
    return "color" if "color" in q else "opposite" if "pposite" in q else "category"


def load(path: Path, tok, response_only: bool) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for line in path.open():
        row = json.loads(line)
        ids = []
        for key in ("chosen", "rejected"):
            msgs = row[key][-1:] if response_only else row[key]
            ids.append(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
        pairs.append((ids[0], ids[1]))
    return pairs


def collate(pairs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]  # chosen first, then rejected
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def rewards(model, ids, mask) -> torch.Tensor:
    logits = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    scores = model.score(logits).squeeze(-1)  # [B, T]
    last = mask.sum(-1) - 1
    return scores[torch.arange(ids.shape[0]), last]


@torch.no_grad()
def evaluate(model, pairs, pad_id: int, batch: int = 200) -> torch.Tensor:
    """Per-pair correctness (1.0 where r_chosen > r_rejected)."""
    model.eval()
    correct = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        r = rewards(model, *collate(chunk, pad_id))
        correct.append((r[: len(chunk)] > r[len(chunk) :]).float())
    model.train()
    return torch.cat(correct)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--response-only", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = LlamaForSequenceClassification.from_pretrained(
        MODEL_DIR, num_labels=1, pad_token_id=tok.pad_token_id, dtype=torch.float32
    )
    train = load(PREFS_DIR / "train.jsonl", tok, args.response_only)
    evals = load(PREFS_DIR / "eval.jsonl", tok, args.response_only)
    tasks = [task_of(json.loads(line)) for line in (PREFS_DIR / "eval.jsonl").open()]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / args.steps)
    rng = random.Random(args.seed)
    order: list[int] = []
    t0 = time.time()
    acc = evaluate(model, evals, tok.pad_token_id).mean().item()
    print(f"step 0 eval_acc {acc:.3f}")
    for step in range(1, args.steps + 1):
        if len(order) < args.batch:
            order += rng.sample(range(len(train)), len(train))
        idx, order = order[: args.batch], order[args.batch :]
        chunk = [train[i] for i in idx]
        r = rewards(model, *collate(chunk, tok.pad_token_id))
        rc, rr = r[: len(chunk)], r[len(chunk) :]
        loss = -F.logsigmoid(rc - rr).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            correct = evaluate(model, evals, tok.pad_token_id)
            acc = correct.mean().item()
            train_acc = (rc > rr).float().mean().item()
            print(
                f"step {step} loss {loss.item():.4f} train_acc {train_acc:.3f} "
                f"eval_acc {acc:.3f} t {time.time() - t0:.1f}s",
                flush=True,
            )
    for task in sorted(set(tasks)):
        sel = torch.tensor([t == task for t in tasks])
        print(f"final eval_acc[{task}] {correct[sel].mean().item():.3f} (n={int(sel.sum())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
