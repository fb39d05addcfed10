"""A Gemma 2 27B reward model like Skywork-Reward-Gemma-2-27B-v0.2, on 32 GPUs.

Model google/gemma-2-27b-it (Skywork's base); data Skywork/Skywork-Reward-Preference-80K-v0.2
(the v0.2 model's data); Bradley-Terry loss. Skywork did not publish the run's learning rate,
batch size or length, so these are the Tulu 3 recipe's: lr 3e-6 linear to 0, 256 pairs per step,
1 epoch, sequences up to 4096 tokens (Gemma 2 reads 8192). Gemma 2's attention soft-cap (50),
its query_pre_attn_scalar (144, not head_dim 128) and its sliding window (4096 on alternate
layers, by token position in packed rows) are the model's: attention `auto` picks an
implementation that expresses them (cuDNN cannot soft-cap).

Will it fit? `python scripts/memory_plan.py --config configs/gemma2_27b.py --devices 32`.
"""

from jaxrm.config import recipe_config


def get_config():
    c = recipe_config()
    c.model_name_or_path = "google/gemma-2-27b-it"
    c.dataset_mixer_list = ["Skywork/Skywork-Reward-Preference-80K-v0.2", "1.0"]
    c.max_token_length = 4096
    c.max_prompt_token_length = 2048
    c.total_train_batch_size = 256
    c.gradient_accumulation_steps = 8
    c.per_device_eval_batch_size = 1
    c.output_dir = "runs/gemma2_27b"
    return c
