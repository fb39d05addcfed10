"""A Llama 3.1 70B reward model like allenai's Llama-3.1-Tulu-3-70B-SFT-RM-RB2, on 64 GPUs.

Model allenai/Llama-3.1-Tulu-3-70B-SFT; data the Tulu 3 70B preference mixture plus
Skywork/Skywork-Reward-Preference-80K-v0.2 (RewardBench 2's "combined" mix); lr 3e-6 linear to 0,
no warmup; 1 epoch (the RB2 model card). The card gives no batch size or length; these are the
RewardBench 2 sweep's: 256 pairs per optimizer step, max_token_length 4096 /
max_prompt_token_length 2048. On 64 devices that is 4 pairs per device per step, fsdp over all
of them (a 70B model's float32 weights and Adam state are ~1.1 TB: 17.5 GB per device).

allenai's best 70B RM of that suite starts from meta-llama/Llama-3.1-70B-Instruct instead
(`--config.model_name_or_path=meta-llama/Llama-3.1-70B-Instruct`, with a tokenizer that has a pad
token distinct from eos: `--config.tokenizer_name=...`).

Will it fit? `python scripts/memory_plan.py --config configs/llama70b.py --devices 64`.
"""

from jaxrm.config import recipe_config


def get_config():
    c = recipe_config()
    c.model_name_or_path = "allenai/Llama-3.1-Tulu-3-70B-SFT"
    c.dataset_mixer_list = [
        "allenai/llama-3.1-tulu-3-70b-preference-mixture",
        "1.0",
        "Skywork/Skywork-Reward-Preference-80K-v0.2",
        "1.0",
    ]
    c.max_token_length = 4096
    c.max_prompt_token_length = 2048
    c.total_train_batch_size = 256
    c.gradient_accumulation_steps = 4
    c.per_device_eval_batch_size = 1
    c.output_dir = "runs/llama70b"
    return c
