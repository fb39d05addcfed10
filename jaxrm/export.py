"""`python -m jaxrm.export`: a training checkpoint -> an HF `*ForSequenceClassification` dir.

    python -m jaxrm.export --checkpoint OUTPUT_DIR [--step N] --output DIR
        [--dtype bfloat16|float32] [--max_shard_size 5GB] [--overwrite]
        [--push_to_hub REPO_ID [--revision BRANCH]]

The directory's format, memory use and safety rules: `jaxrm.hf_export`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import jax

from jaxrm.dtypes import EXPORT_DTYPES
from jaxrm.errors import UserError, exit_on_user_error, first_line, run_cli
from jaxrm.hf_export import EXPORT_MARKER, export_checkpoint
from jaxrm.logs import setup_logging


def push_to_hub(folder: Path, repo_id: str, revision: str | None) -> str:
    """Uploads the export folder (creating the repo, and the branch when given)."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message="Upload jaxrm reward model",
            ignore_patterns=[EXPORT_MARKER],
        )
    except Exception as e:  # noqa: BLE001 - any hub failure is one user-facing line
        raise UserError(f"push to hub {repo_id} failed: {first_line(e)}") from None
    return str(getattr(info, "commit_url", repo_id))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxrm.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="training output directory")
    parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    parser.add_argument("--output", required=True, help="directory to write the HF model to")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="bfloat16", help="weights")
    parser.add_argument("--max_shard_size", default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID")
    parser.add_argument("--revision", default=None, help="hub branch for --push_to_hub")
    args = parser.parse_args(argv)
    if args.revision and not args.push_to_hub:
        parser.error("--revision needs --push_to_hub")
    return args


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    setup_logging(jax.process_index() == 0)
    output, step = export_checkpoint(
        args.checkpoint,
        args.output,
        step=args.step,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    if jax.process_index() == 0:
        print(f"exported {args.checkpoint} step {step} ({args.dtype}) -> {output}")
        if args.push_to_hub:
            print(f"pushed -> {push_to_hub(output, args.push_to_hub, args.revision)}")
    return output


if __name__ == "__main__":
    run_cli(main)
