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

from jaxrm.config import base_config


def get_config():
    c = base_config()
    c.model_name_or_path = "google/gemma-2-27b-it"
    c.dataset_mixer_list = ["Skywork/Skywork-Reward-Preference-80K-v0.2", "1.0"]
    c.dataset_mixer_list_splits = ["train"]
    c.dataset_mixer_eval_list = ["allenai/ultrafeedback_binarized_cleaned", "1.0"]
    c.dataset_mixer_eval_list_splits = ["test_prefs"]
    c.max_token_length = 4096
    c.max_prompt_token_length = 2048
    c.learning_rate = 3e-6
    c.lr_scheduler_type = "linear"
    c.warmup_ratio = 0.0
    c.num_train_epochs = 1
    c.total_train_batch_size = 256
    c.gradient_accumulation_steps = 8
    c.per_device_eval_batch_size = 1
    c.seed = 8
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    c.gradient_checkpointing = True
    c.remat_policy = "full"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.output_dir = "runs/gemma2_27b"
    c.logging_steps = 1
    c.eval_steps = 100
    c.checkpointing_steps = 100
    c.export_dtype = "bfloat16"
    c.dataset_num_proc = 16
    return c
