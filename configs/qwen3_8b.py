"""A Qwen3-8B reward model by the Skywork-Reward-V2 recipe (arXiv 2507.01352, App. E), on 64 GPUs.

Model Qwen/Qwen3-8B (the post-trained checkpoint Skywork-Reward-V2-Qwen3-8B starts from;
Qwen/Qwen3-8B-Base has the same architecture: `--config.model_name_or_path=Qwen/Qwen3-8B-Base`);
plain Bradley-Terry loss; sequences up to 16,384 tokens (filtered, never truncated); lr 3e-6,
constant; bf16 compute with float32 master weights and Adam, sharded ZeRO-3 style over `fsdp`;
gradient checkpointing on; packed rows with the prompt shared by both responses.

Batch: the Tulu 3 recipe's 4 pairs per device x 4 accumulation steps, scaled to 64 devices:
1,024 pairs per optimizer step. Skywork's final runs used 10,240 pairs per step
(`--config.total_train_batch_size=10240 --config.gradient_accumulation_steps=40`) on 26M curated
pairs that are not public; the public Skywork preference set is used here instead.

Will it fit? `python scripts/memory_plan.py --config configs/qwen3_8b.py --devices 64`
(benchmarks/RESULTS.md records the plan). Check a cluster first with
`python -m jaxrm.devices --config configs/qwen3_8b.py` on every host.
"""

from jaxrm.config import recipe_config


def get_config():
    c = recipe_config()
    c.model_name_or_path = "Qwen/Qwen3-8B"
    c.dataset_mixer_list = ["Skywork/Skywork-Reward-Preference-80K-v0.2", "1.0"]
    c.max_token_length = 16384
    c.max_prompt_token_length = 8192
    c.lr_scheduler_type = "constant"
    c.total_train_batch_size = 1024
    c.gradient_accumulation_steps = 4
    c.output_dir = "runs/qwen3_8b"
    c.eval_steps = 50
    c.checkpointing_steps = 50
    return c
