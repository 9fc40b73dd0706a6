"""
Supervised fine-tuning: stage 1 of the Tulu 3 recipe.

Train on chat conversations, loss only on assistant turns (content + end-of-turn token), documents packed
padding-free into one row per micro-batch, FSDP2 over all ranks.

On a laptop CPU, the embedded defaults (SmolLM2-135M-Instruct on GSM8K-train conversations):
    python sft.py
One node of 8 GPUs, Tulu 3 8B hyperparameters (effective batch 8 x 1 x 16 = 128; README: the full recipe):
    torchrun --nproc_per_node 8 sft.py --model_name_or_path meta-llama/Llama-3.1-8B --chat_template tulu \
        --dataset_mixer_list allenai/tulu-3-sft-mixture 1.0 --max_seq_length 4096 --per_device_train_batch_size 1 \
        --gradient_accumulation_steps 16 --learning_rate 5e-06 --lr_scheduler_type linear --warmup_ratio 0.03 \
        --weight_decay 0.0 --num_train_epochs 2 --reduce_loss sum --seed 123 --output_dir output/sft_8b
Tulu 3's own layout, 8 nodes (64 x 1 x 2 = 128): the same flags with --gradient_accumulation_steps 2, launched by
    `torchrun --nnodes 8 --node_rank $NODE_RANK --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint $MASTER_ADDR:29500 sft.py ...`
"""
import argparse
import collections
import math
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import common

ROOT = os.path.dirname(os.path.abspath(__file__))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# model and data
parser.add_argument("--model_name_or_path", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
parser.add_argument("--tokenizer_name", default=None, help="defaults to --model_name_or_path")
parser.add_argument("--chat_template", default="default", choices=["default", "tulu"], help="default: the tokenizer's own")
parser.add_argument("--dataset_mixer_list", nargs="+", default=[os.path.join(ROOT, "data", "sft_gsm8k.jsonl"), "128"],
                    help="SOURCE WEIGHT pairs: jsonl/json/parquet file or hub dataset; weight <= 1 a fraction, > 1 a count")
parser.add_argument("--max_seq_length", type=int, default=4096)
parser.add_argument("--overlong", default="truncate", choices=["truncate", "drop"],
                    help="examples past --max_seq_length: cut there (as open-instruct does) or left out; counted either way")
parser.add_argument("--preprocessing_num_workers", type=int, default=min(8, os.cpu_count()))
parser.add_argument("--dataset_local_cache_dir", default=os.path.join(ROOT, "cache", "tokenized"),
                    help="the tokenized mixture is stored here once and reused by later runs, ranks and --resume")
# optimization (flag names of the published Tulu 3 command)
parser.add_argument("--per_device_train_batch_size", type=int, default=4, help="examples per micro-batch")
parser.add_argument("--gradient_accumulation_steps", type=int, default=4,
                    help="global batch = per_device_train_batch_size x gradient_accumulation_steps x world size examples")
parser.add_argument("--max_tokens_per_micro_batch", type=int, default=0,
                    help="> 0: balance each global batch's tokens over ranks and pack each rank's share into micro-batches "
                         "of at most this many tokens (the global batch keeps its number of examples)")
parser.add_argument("--learning_rate", type=float, default=2e-5)
parser.add_argument("--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant"])
parser.add_argument("--warmup_ratio", type=float, default=0.03)
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--clip_grad_norm", type=float, default=1.0,
                    help="clip the global grad norm as Tulu 3's runs did (see the loop); <= 0: off")
parser.add_argument("--num_train_epochs", type=int, default=1)
parser.add_argument("--max_steps", type=int, default=-1, help="> 0 overrides --num_train_epochs")
parser.add_argument("--reduce_loss", default="sum", choices=["sum", "mean"],
                    help="sum: summed token losses / micro-batches (Tulu 3's gradient); mean: / trained tokens of the global batch")
parser.add_argument("--seed", type=int, default=123)
parser.add_argument("--gradient_checkpointing", action="store_true")
parser.add_argument("--mixed_precision", default=None, choices=["bf16", "no"],
                    help="bf16: compute in bf16 on fp32 master weights; default bf16 on CUDA, no (all fp32) on CPU")
parser.add_argument("--no_padding_free", action="store_true", help="pad micro-batches instead of packing them")
# outputs
parser.add_argument("--output_dir", default=os.path.join(ROOT, "out", "sft"))
parser.add_argument("--checkpointing_steps", default=None, help="an integer (every N steps) or 'epoch'")
parser.add_argument("--keep_last_n_checkpoints", type=int, default=2)
parser.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"], help="continue from the newest checkpoint; auto: if any")
parser.add_argument("--with_tracking", action="store_true", help="also log metrics.jsonl's metrics to --report_to")
parser.add_argument("--report_to", default="all", choices=["all", "tensorboard", "wandb"], help="all: both; W&B offline")
# accepted so the published open-instruct command runs unchanged; they change nothing here
for flag in ["--use_flash_attn", "--use_slow_tokenizer"]:
    parser.add_argument(flag, action="store_true", help="accepted for compatibility; no effect")
for flag in ["--exp_name", "--dataset_mix_dir", "--logging_steps"]:
    parser.add_argument(flag, default=None, help="accepted for compatibility; no effect")
# Tulu 3's commands pass main; another revision of a hub model was accepted and silently not loaded
parser.add_argument("--model_revision", default="main", choices=["main"], help="the hub model's main branch only")
args = parser.parse_args()
# stored in each checkpoint: a resume continues the same run (its flags, and the global batch in examples); under sum,
# also what the summed loss is divided by (accumulation x ranks, below): a resume from 2 x 2 to 1 x 4 halved the gradient
world = int(os.environ.get("WORLD_SIZE", 1))
run_settings = vars(args) | {"global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * world}
run_settings |= {"sum_loss_divisor": args.gradient_accumulation_steps * world} if args.reduce_loss == "sum" else {}
# every flag in its range, --output_dir free of another run's checkpoints; with --resume, the checkpoint to continue
resume_from = common.check_args(parser, args, run_settings, count_or_all=["keep_last_n_checkpoints"],
                                at_least_one=["max_seq_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                                              "num_train_epochs"],
                                at_least_zero=["learning_rate", "weight_decay", "max_tokens_per_micro_batch"], fraction=["warmup_ratio"])
common.require_model_directory(args.model_name_or_path, args.tokenizer_name)
common.require_trackers(args.with_tracking, args.report_to)

# ----------------------------------------------------------------------------- Distributed setup

use_cuda = torch.cuda.is_available()
# torchrun's group, or for a plain `python sft.py` a group of one, so the FSDP code below is the same everywhere
dist.init_process_group("nccl" if use_cuda else "gloo", **({} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)))
rank, world_size = dist.get_rank(), dist.get_world_size()
local_rank = int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
if use_cuda:
    torch.cuda.set_device(device)
bf16 = (args.mixed_precision or ("bf16" if use_cuda else "no")) == "bf16"
print0 = lambda *a, **k: print(*a, **k) if rank == 0 else None
torch.manual_seed(args.seed)
common.agree_on_resume(resume_from)  # one checkpoint on every rank (several nodes: a shared --output_dir)

# ----------------------------------------------------------------------------- Data

tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
common.set_chat_template(tokenizer, args.chat_template)
common.stop_token_ids(tokenizer, args.model_name_or_path)  # refuses a template whose turns end where the model never stops
common.claim_output_dir(args.output_dir, args.model_name_or_path)  # checks passed: the run takes it (not while another runs there)
special_text = common.special_token_text(tokenizer)


def sft_example(where, row):
    """(reason, {input_ids, labels}) of one row; the reason counts a dropped or truncated example (common.tokenize_once)."""
    common.check_messages(row.get("messages"), where)
    if not any(m["role"] == "assistant" for m in row["messages"]):
        raise ValueError(f"{where}: field 'messages' has no assistant turn to train on")
    input_ids, labels = common.tokenize_conversation(tokenizer, row["messages"])
    reasons = ("special text",) if any(special_text.search(m["content"]) for m in row["messages"]) else ()
    truncated = len(input_ids) > args.max_seq_length
    if truncated and args.overlong == "drop":
        return reasons + ("overlong",), None
    input_ids, labels = input_ids[: args.max_seq_length], labels[: args.max_seq_length]
    if all(label == -100 for label in labels[1:]):  # the first label is never a target (nothing predicts it)
        return reasons + ("untrained",), None
    return reasons + ("truncated",) * truncated, {"input_ids": input_ids, "labels": labels}  # (a row dropped: counted there only)


# Tokenized once per machine into a memory-mapped Arrow file, which every later run, rank and --resume reads:
# read_rows(ids) reads examples from it; lengths (N,) int32 is all that is held in memory per example.
read_rows, lengths, data_stats = common.tokenize_once(
    args.dataset_mixer_list, sft_example, ["input_ids", "labels"],
    key=["sft", common.tokenizer_fingerprint(tokenizer), tokenizer.chat_template, args.max_seq_length, args.overlong],
    cache_dir=args.dataset_local_cache_dir, num_workers=args.preprocessing_num_workers)
global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
steps_per_epoch = len(lengths) // global_batch_size
if steps_per_epoch == 0:
    raise ValueError(f"{len(lengths)} usable examples do not fill one global batch of {global_batch_size}")
if 0 < args.max_tokens_per_micro_batch < args.max_seq_length:
    raise ValueError(f"--max_tokens_per_micro_batch {args.max_tokens_per_micro_batch} < --max_seq_length {args.max_seq_length}")
total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
counts = collections.Counter(data_stats["counts"])
print0(f"{data_stats['rows']} rows -> {len(lengths)} examples ({counts['overlong']} dropped as longer than "
       f"{args.max_seq_length} tokens, {counts['truncated']} truncated, {counts['untrained']} dropped with no trained "
       f"token, {counts['special text']} with a special token's text in a message, tokenized as that token); "
       f"{data_stats['how']} {data_stats['path']}; global batch {global_batch_size}, "
       f"{steps_per_epoch} steps per epoch ({len(lengths) % global_batch_size} examples of each epoch's shuffle left "
       f"over), {total_steps} steps")


def global_batch(step):
    """The example ids of optimizer step `step`: a fresh seeded shuffle every epoch, so a resumed run sees the same data."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    return order[index * global_batch_size : (index + 1) * global_batch_size]


def read_examples(ids):
    """[(input_ids, labels)] of example ids, read from the memory-mapped file."""
    return [(row["input_ids"], row["labels"]) for row in read_rows(ids)]


# ----------------------------------------------------------------------------- Model

common.register_packed_attention()
config = AutoConfig.from_pretrained(args.model_name_or_path)
attn_implementation = "sdpa" if args.no_padding_free else "packed"
# Build on the meta device (no memory), shard, then materialize only this rank's shards: an 8B model never sits whole
# in every rank's memory. Rank 0 alone reads the checkpoint and broadcasts it.
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
model.generation_config = common.generation_config(args.model_name_or_path)  # saved with it: its stop ids, as given
if args.gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
# bf16: compute in bf16, keep fp32 master weights and reduce gradients in fp32 (a CPU with AVX512-BF16 or AMX runs
# bf16 matmuls ~3-5x faster than fp32). Otherwise everything fp32, the reference the CPU tests compare against.
mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
if not args.no_padding_free:  # (refused now, not at the first document that outgrows a window, hours in)
    common.refuse_packing(model, int(max(lengths)), "sft.py --no_padding_free pads instead")
for blocks in common.decoder_layers(model):
    fully_shard(blocks, mp_policy=mp_policy)
fully_shard(model, mp_policy=mp_policy)
common.materialize(model, device)  # real storage for this rank's shards; non-persistent buffers computed
full_state_dict = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).state_dict() if rank == 0 else {}
set_model_state_dict(model, full_state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
del full_state_dict
common.wrap_token_logps(model)
n_params = sum(p.numel() for p in model.parameters())
print0(f"{args.model_name_or_path}: {n_params / 1e6:.1f}M parameters, attention {attn_implementation}, world size {world_size}")

optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=use_cuda)
warmup_steps = math.ceil(args.warmup_ratio * total_steps)  # then linear / cosine decay to 0, or constant


# MFU: dense bf16 peak 989 TFLOP/s per H100 / H200 GPU
peak_flops = 989e12 if use_cuda and any(h in torch.cuda.get_device_name() for h in ("H100", "H200")) else None

# ----------------------------------------------------------------------------- Checkpoints

os.makedirs(args.output_dir, exist_ok=True)
metrics_path = os.path.join(args.output_dir, "metrics.jsonl")


def save_checkpoint(step):
    """Model + optimizer shards via torch.distributed.checkpoint; the step (which fixes the data position and the lr)
    and every rank's RNG state beside them. A `done` file marks a complete checkpoint."""
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    common.finish_checkpoint(path, {"step": step, "run": run_settings}, args.keep_last_n_checkpoints)


start_step = 0
if resume_from:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=resume_from)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    start_step = common.load_trainer_state(resume_from)["step"]  # (and this rank's RNG state restored)
    print0(f"resumed from {resume_from} at step {start_step}")
# a new log, or on --resume the lines up to the checkpoint's step: it reads like one uninterrupted run (rank 0's)
common.start_log(metrics_path, start_step if resume_from else None)
# --with_tracking: the same metrics also to TensorBoard / W&B
track = common.start_tracking(args.report_to, args.output_dir, "sft", vars(args), start_step) if args.with_tracking else None
checkpoint_every = steps_per_epoch if args.checkpointing_steps == "epoch" else int(args.checkpointing_steps or 0)

# ----------------------------------------------------------------------------- Training loop

model.train()
progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=rank != 0, desc="sft")
for step in progress:
    step_start = time.time()
    batch = global_batch(step)
    # Every rank knows the whole global batch, so the normalizer for --reduce_loss mean needs no communication:
    # the trained tokens of all ranks and all accumulation steps together.
    global_tokens = sum(sum(label != -100 for label in labels[1:]) for _, labels in read_examples(batch))
    # mean: the global token mean (FSDP averages over ranks: undone). sum: the gradient Tulu 3's DeepSpeed computed,
    # each micro-batch's summed loss / accumulation steps, averaged over ranks, so AdamW's eps and the clip act on it
    loss_scale = world_size / global_tokens if args.reduce_loss == "mean" else 1 / args.gradient_accumulation_steps
    shares = common.micro_batch_shares(batch, lengths, world_size, args.per_device_train_batch_size,
                                       args.gradient_accumulation_steps, args.max_tokens_per_micro_batch)
    mine = shares[rank]
    rank_tokens = [sum(int(lengths[i]) for micro_batch in share for i in micro_batch) for share in shares]
    loss_sum, input_tokens, attended = torch.zeros((), device=device), 0, 0
    for m, micro_batch in enumerate(mine):
        model.set_requires_gradient_sync(m == len(mine) - 1)  # reduce-scatter once per step, not per micro-step
        # an empty micro-batch (a rank with fewer examples than micro-steps) runs one untrained token: FSDP needs
        # every rank in every forward and backward
        micro_examples = read_examples(micro_batch) or [(read_examples(batch[:1])[0][0][:1], [-100])]
        inputs, targets = common.collate(micro_examples, not args.no_padding_free, tokenizer.pad_token_id or 0, device)
        token_losses = -model.token_logps(inputs, targets)[0]  # (T,), never the whole (T, V) fp32 logits
        (token_losses.sum() * loss_scale).backward()
        loss_sum += token_losses.sum().detach()
        input_tokens += sum(len(ids) for ids, _ in micro_examples)
        attended += sum(len(ids) ** 2 for ids, _ in micro_examples)
    # Tulu 3 clipped at 1.0 though no flag says so: open-instruct's DeepSpeed config has "gradient_clipping": "auto",
    # which accelerate 0.31 (the version it pinned) fills with 1.0 (accelerator.py:1621; its own --clip_grad_norm is a
    # no-op under DeepSpeed).
    max_norm = args.clip_grad_norm if args.clip_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    lr = common.learning_rate(step, args.learning_rate, warmup_steps, total_steps, args.lr_scheduler_type)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    totals = torch.tensor([loss_sum.item(), input_tokens, attended], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    elapsed = time.time() - step_start
    metrics = dict(step=step + 1, epoch=step // steps_per_epoch, loss=totals[0].item() / global_tokens, lr=lr,
                   grad_norm=grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else grad_norm.item(),
                   tokens=global_tokens, tokens_per_sec=totals[1].item() / elapsed, micro_steps=len(mine),
                   rank_token_imbalance=max(rank_tokens) / (sum(rank_tokens) / world_size))  # 1.0: every rank as busy
    if peak_flops:
        metrics["mfu"] = common.training_flops(config, n_params, totals[1].item(), totals[2].item()) / elapsed / (peak_flops * world_size)
    common.append_log(metrics_path, [metrics], track)  # (rank 0's, to its tracker too)
    progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_sec']:.0f}")
    if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
        save_checkpoint(step + 1)

# ----------------------------------------------------------------------------- Save

# An ordinary HF directory (bf16 when trained in bf16) with the tokenizer and its chat template, gathered on rank 0:
# transformers and vLLM load it as they would any released model.
common.save_model(model, tokenizer, args.output_dir, torch.bfloat16 if bf16 else torch.float32)
dist.destroy_process_group()
