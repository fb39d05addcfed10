"""Tokenizer loading and chat-template encoding, done exactly once per conversation.

The chat template's text is tokenized by `apply_chat_template(tokenize=True)` itself: never
re-encode template text with special tokens added (that is how a double BOS happens).
"""

from __future__ import annotations

import logging
from pathlib import Path

from jaxrm.errors import UserError, first_line

Messages = list[dict[str, str]]

# What transformers logs at import without torch (5.x; 4.x's wording second): true of every jaxrm
# run, and of no use to a user of a JAX trainer.
TORCH_NOTICES = ("PyTorch was not found. Models won't be available", "None of PyTorch, TensorFlow")


class _DropTorchNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TORCH_NOTICES)


def silence_torch_notice() -> None:
    """Drops exactly transformers' "PyTorch was not found" line (its other warnings stay). Must
    run before transformers is imported: `import jaxrm` does it."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropTorchNotice) for f in logger.filters):
        logger.addFilter(_DropTorchNotice())


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """An HF tokenizer that has a chat template and a pad token."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    if str(name_or_path).startswith((".", "/", "~")) and not local.is_dir():
        raise UserError(f"tokenizer directory {name_or_path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
    except Exception as e:  # noqa: BLE001 - any loading failure is one user-facing line
        raise UserError(f"cannot load tokenizer {name_or_path}: {first_line(e)}") from None
    if not tokenizer.chat_template:
        raise UserError(f"tokenizer {name_or_path} has no chat template")
    if tokenizer.pad_token_id is None:
        raise UserError(
            f"tokenizer {name_or_path} has no pad token; add one (e.g. '<pad>') distinct from eos"
        )
    return tokenizer


def check_pad_token(tokenizer, name: str) -> None:
    """Refuses a pad token that is the eos token (training only): jaxrm reads rewards from the
    attention mask and would be right, but transformers' classifier reads the last non-pad token,
    so every PyTorch consumer of the export would score the token before the final eos."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(
            f"tokenizer {name}: the pad token {tokenizer.pad_token!r} is the eos token, so "
            "PyTorch consumers of the exported model would read rewards one token early; add a "
            "distinct pad token (tokenizer.add_special_tokens({'pad_token': '<pad>'}), "
            "save_pretrained(DIR)) and pass --config.tokenizer_name=DIR"
        )


def encode_conversation(
    tokenizer, messages: Messages, where: str = "", add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of `messages` rendered by the chat template (special tokens from the template)."""
    try:
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    except Exception as e:  # noqa: BLE001 - template errors (jinja) are about the data
        raise UserError(f"{where}: chat template failed ({type(e).__name__}: {e})") from None
    return [int(t) for t in ids]


ROLE_PROBE = "jaxrm-role-probe-5e1f"


def check_roles(
    tokenizer, conversation: Messages, where: str, key: str, rendered: set[str]
) -> None:
    """Renders each role of `conversation` not yet in `rendered` once, with a marker as its first
    message's content; a role whose marker the template drops (e.g. 'human' or 'tool' in a template
    that only knows system/user/assistant) is an error naming `where` and the message, not
    silently missing text. Roles that render are added to `rendered`."""
    for j, message in enumerate(conversation):
        if message["role"] in rendered:
            continue
        probe = [dict(m) for m in conversation]
        probe[j]["content"] = ROLE_PROBE
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception as e:  # noqa: BLE001 - template errors are about the data
            raise UserError(f"{where}: chat template failed ({first_line(e)})") from None
        if ROLE_PROBE not in text:
            raise UserError(
                f"{where}: {key}[{j}] has role {message['role']!r}, which the tokenizer's chat "
                "template drops; use a role it renders (e.g. system, user, assistant)"
            )
        rendered.add(message["role"])
