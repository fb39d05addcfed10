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

from jaxrm.config import recipe_config


def get_config():
    c = recipe_config()
    c.model_name_or_path = "allenai/OLMo-2-1124-7B-SFT"
    c.dataset_mixer_list = ["allenai/olmo-2-1124-7b-preference-mix", "1.0"]
    c.max_token_length = 2048
    c.max_prompt_token_length = 2048
    c.total_train_batch_size = 256
    c.gradient_accumulation_steps = 4
    c.output_dir = "runs/olmo2_7b"
    return c
