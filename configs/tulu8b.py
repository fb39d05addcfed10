"""The Tulu 3 8B reward model (open-instruct `reward_modeling.py`), number for number.

Model allenai/Llama-3.1-Tulu-3-8B-SFT; data allenai/llama-3.1-tulu-3-8b-preference-mixture (1.0,
train); eval allenai/ultrafeedback_binarized_cleaned (test_prefs); lr 3e-6 linear to 0, no warmup;
1 epoch; 256 pairs per optimizer step (the reference's 4 per device x 4 accumulation x 16 GPUs);
max_token_length 4096 / max_prompt_token_length 2048 (filtered, never truncated); seed 8; bf16
compute with float32 master weights and optimizer state, sharded ZeRO-3 style over `fsdp`;
gradient checkpointing on; the packed batch layout with attention `auto`: cuDNN flash attention
on GPUs (the tree mask as a dense array built once per micro-batch), splash attention on TPUs
(the tree as a dynamic mask), jaxrm's blocked flash attention on the CPU. Expect
(the reference's published curves): train accuracy 0.65 -> ~0.80, loss 0.60 -> ~0.37, final
chosen/rejected rewards ~5.5 / ~3.0, ~1,050 steps.

TPU pod (every host runs the same command; jax.distributed is detected automatically):
    gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
      "cd jaxrm && scripts/train.sh configs/tulu8b.py --config.output_dir=gs-or-nfs/path/tulu8b"

GPU hosts (e.g. 2 x 8 H100 under SLURM, one process per host; or give the coordinator):
    srun --nodes=2 --ntasks-per-node=1 scripts/train.sh configs/tulu8b.py \
      --config.output_dir=/shared/tulu8b
    # without SLURM, on each host i of N:
    scripts/train.sh configs/tulu8b.py --config.distributed.coordinator_address=HOST0:1234 \
      --config.distributed.num_processes=N --config.distributed.process_id=i

Check a new pod or cluster first: `python -m jaxrm.devices --config configs/tulu8b.py` (on every
host) prints the devices, the mesh and the pairs per device, or why they do not fit.

256 pairs per step must divide by the data-parallel device count (data x fsdp); with 16 devices
that is 4 pairs per device x 4 accumulation steps, as in the reference.
"""

from jaxrm.config import recipe_config


def get_config():
    c = recipe_config()
    c.model_name_or_path = "allenai/Llama-3.1-Tulu-3-8B-SFT"
    c.tokenizer_name = ""  # the SFT checkpoint's tokenizer (pad <pad>, Tulu chat template)
    c.dataset_mixer_list = ["allenai/llama-3.1-tulu-3-8b-preference-mixture", "1.0"]
    c.max_token_length = 4096
    c.max_prompt_token_length = 2048
    c.total_train_batch_size = 256
    c.gradient_accumulation_steps = 4
    c.output_dir = "runs/tulu8b"
    return c
