"""The offline default in K-wise form: the shipped tiny Llama on the shipped tiny K-wise set (the
prompts of the tiny pairs, each with 4 responses: the right one scored 1, three wrong ones 0).

    python -m jaxrm.train --config configs/tiny_kwise.py [--config.kwise_objective=plackett_luce]

Each prompt is packed once with its 4 responses (3 implied pairs); batch sizes count prompts.
Everything else is `configs/tiny.py`'s.
"""

from pathlib import Path

from jaxrm.assets import TINY_KWISE_EVAL_FILE, TINY_KWISE_TRAIN_FILE
from jaxrm.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("tiny.py")))
    c.preference_format = "kwise"
    c.dataset_mixer_list = [str(TINY_KWISE_TRAIN_FILE), "1.0"]
    c.dataset_mixer_eval_list = [str(TINY_KWISE_EVAL_FILE), "1.0"]
    c.total_train_batch_size = 32  # prompts per step (96 implied pairs)
    c.output_dir = "runs/tiny_kwise"
    return c
