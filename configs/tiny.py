"""The offline default: the shipped tiny Llama (2 layers, hidden 64) on the shipped tiny preference
set (4,000 train / 400 eval pairs that can only be learned by reading prompt and response).

    python -m jaxrm.train --config configs/tiny.py [--config.output_dir=runs/tiny]

On 2 CPU cores it trains 8 epochs (1,000 steps of 32 pairs) in under two minutes: eval accuracy
sits at chance for ~400 steps (the fresh head must learn to read the prompt), then climbs to
>= 0.95 (see README for the measured figures). `dtype` and `attention` are left at `auto`
(jaxrm/backends.py) and the batch layout at `packed`: float32 compute on CPU (XLA:CPU has no
native bf16 and runs it slower), bf16 on GPUs and TPUs; attention per mask kind: jaxrm's blocked
flash attention on the CPU, cuDNN's on GPUs (the packed mask as a dense array), and flash on TPUs
(the tiny model's head_dim 16 is below splash attention's 128); weights are float32 everywhere.
"""

from jaxrm.assets import BENCHMARK_FIXTURES, TINY_EVAL_FILE, TINY_MODEL_DIR, TINY_TRAIN_FILE
from jaxrm.config import base_config


def get_config():
    c = base_config()
    c.model_name_or_path = str(TINY_MODEL_DIR)
    c.dataset_mixer_list = [str(TINY_TRAIN_FILE), "1.0"]
    c.dataset_mixer_list_splits = ["train"]
    c.dataset_mixer_eval_list = [str(TINY_EVAL_FILE), "1.0"]
    c.dataset_mixer_eval_list_splits = ["train"]
    c.max_token_length = 128
    c.max_prompt_token_length = 96
    c.learning_rate = 1e-3
    c.lr_scheduler_type = "linear"
    c.num_train_epochs = 8
    c.total_train_batch_size = 32  # pairs per step, whatever the device count
    c.per_device_eval_batch_size = 100
    c.seed = 8
    c.dtype = "auto"
    c.param_dtype = "float32"
    c.output_dir = "runs/tiny"
    c.logging_steps = 10
    c.eval_steps = 125
    # offline stand-ins for --config.eval_benchmarks=['rewardbench','rewardbench2']
    c.eval_benchmark_data.rewardbench = str(BENCHMARK_FIXTURES["rewardbench"])
    c.eval_benchmark_data.rewardbench2 = str(BENCHMARK_FIXTURES["rewardbench2"])
    c.export_dtype = "float32"
    return c
