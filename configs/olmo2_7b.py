"""allenai's OLMo 2 7B reward model (OLMo-2-1124-7B-RM), as open-instruct trained it.

Model allenai/OLMo-2-1124-7B-SFT (the RM's base per its model card); data
allenai/olmo-2-1124-7b-preference-mix (train; the RM card names its `-for-rm` variant, which
`--config.dataset_mixer_list` takes as well); eval allenai/ultrafeedback_binarized_cleaned
(test_prefs); lr 3e-6 linear to 0, no warmup; 1 epoch; 256 pairs per optimizer step (the
reference's 1 per device x 16 accumulation x 16 GPUs); max_token_length 2048 /
max_prompt_token_length 2048 (filtered, never truncated). Source: open-instruct
docs/archived_dev_scripts/olmo2_1124.sh, section `# 7b RM`.

The released RM's embedding has 100,280 rows (open-instruct then resized every model to its
tokenizer, rounded up to 8); jaxrm keeps the SFT checkpoint's 100,352 unless the tokenizer has
more tokens. Rewards are the same; only unused rows differ.

Will it fit? `python scripts/memory_plan.py --config configs/olmo2_7b.py --devices 16`.
"""

from jaxrm.config import base_config


def get_config():
    c = base_config()
    c.model_name_or_path = "allenai/OLMo-2-1124-7B-SFT"
    c.dataset_mixer_list = ["allenai/olmo-2-1124-7b-preference-mix", "1.0"]
    c.dataset_mixer_list_splits = ["train"]
    c.dataset_mixer_eval_list = ["allenai/ultrafeedback_binarized_cleaned", "1.0"]
    c.dataset_mixer_eval_list_splits = ["test_prefs"]
    c.max_token_length = 2048
    c.max_prompt_token_length = 2048
    c.learning_rate = 3e-6
    c.lr_scheduler_type = "linear"
    c.warmup_ratio = 0.0
    c.num_train_epochs = 1
    c.total_train_batch_size = 256
    c.gradient_accumulation_steps = 4
    c.per_device_eval_batch_size = 4
    c.seed = 8
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.gradient_checkpointing = True
    c.remat_policy = "full"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.output_dir = "runs/olmo2_7b"
    c.logging_steps = 1
    c.eval_steps = 100
    c.checkpointing_steps = 100
    c.export_dtype = "bfloat16"
    c.dataset_num_proc = 16
    return c
