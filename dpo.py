"""
Direct preference optimization: stage 2 of the Tulu 3 recipe.

Train on (prompt, chosen, rejected) triples so the policy prefers the chosen response more than the initial model (the
reference) does. Default loss: Tulu 3's length-normalized DPO ("dpo_norm"),
    L = -log sigmoid( beta/|y_c| * log pi(y_c|x)/ref(y_c|x) - beta/|y_r| * log pi(y_r|x)/ref(y_r|x) )
The reference log-probs are computed once, by the initial model before the first step, and cached on disk by pair:
no second model is held during training. Chosen and rejected of a micro-batch go through ONE padding-free forward.

On a laptop CPU, the embedded defaults (out/sft if sft.py has run, else SmolLM2-135M-Instruct; on-policy GSM8K pairs):
    python dpo.py
One node of 8 GPUs, Tulu 3 8B hyperparameters (effective batch 8 x 1 x 16 = 128 pairs):
    torchrun --nproc_per_node 8 dpo.py --model_name_or_path output/sft_8b --chat_template tulu \
        --dataset_mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 1.0 --max_seq_length 2048 \
        --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --learning_rate 5e-07 \
        --lr_scheduler_type linear --warmup_ratio 0.1 --weight_decay 0.0 --num_train_epochs 1 \
        --loss_type dpo_norm --beta 5 --gradient_checkpointing --seed 123 --output_dir output/dpo_8b
Several nodes: as in sft.py. The reference cache is written by rank 0 only, so it needs no shared filesystem.
"""
import argparse
import collections
import hashlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import common

ROOT = os.path.dirname(os.path.abspath(__file__))
SFT_OUTPUT = os.path.join(ROOT, "out", "sft")  # the recipe's order: DPO starts from the SFT model when there is one
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# model and data
parser.add_argument("--model_name_or_path", default=SFT_OUTPUT if os.path.exists(os.path.join(SFT_OUTPUT, "config.json"))
                    else os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"), help="default: out/sft if it exists, "
                    "else the embedded SmolLM2-135M-Instruct. It is also the reference model")
parser.add_argument("--tokenizer_name", default=None, help="defaults to --model_name_or_path")
parser.add_argument("--chat_template", default="default", choices=["default", "tulu"], help="default: the tokenizer's own")
parser.add_argument("--dataset_mixer_list", nargs="+", default=[os.path.join(ROOT, "data", "dpo_gsm8k.jsonl"), "48"],
                    help="SOURCE WEIGHT pairs: jsonl/json/parquet file or hub dataset; weight <= 1 a fraction, > 1 a count")
parser.add_argument("--max_seq_length", type=int, default=2048, help="per side (prompt + response)")
parser.add_argument("--overlong", default="truncate", choices=["truncate", "drop"],
                    help="pairs with a side past --max_seq_length: both sides cut there (as open-instruct does) or left out")
parser.add_argument("--preprocessing_num_workers", type=int, default=min(8, os.cpu_count()))
parser.add_argument("--dataset_local_cache_dir", default=os.path.join(ROOT, "cache", "tokenized"),
                    help="the tokenized pairs are stored here once and reused by later runs, ranks and --resume")
# the preference loss (the second names are open-instruct's)
parser.add_argument("--loss_type", "--dpo_loss_type", default="dpo_norm", choices=["dpo_norm", "dpo", "simpo"])
parser.add_argument("--beta", "--dpo_beta", type=float, default=None,
                    help="default: 5 for dpo_norm (Tulu 3), 0.1 for dpo (DPO paper), 2.0 for simpo (SimPO paper)")
parser.add_argument("--gamma_beta_ratio", type=float, default=0.5, help="simpo: target margin gamma = ratio * beta")
parser.add_argument("--label_smoothing", "--dpo_label_smoothing", type=float, default=0.0,
                    help="conservative DPO: the assumed probability that a preference label is flipped")
parser.add_argument("--no_cache_ref", action="store_true",
                    help="compute reference log-probs live, with a frozen copy of the initial model (for comparison)")
parser.add_argument("--ref_cache_dir", default=os.path.join(ROOT, "cache", "ref_logps"),
                    help="one file per (initial weights, tokenized pairs, chat template, max length, dtype)")
# optimization (flag names of the published Tulu 3 commands)
parser.add_argument("--per_device_train_batch_size", type=int, default=2, help="pairs per micro-batch")
parser.add_argument("--gradient_accumulation_steps", type=int, default=4,
                    help="global batch = per_device_train_batch_size x gradient_accumulation_steps x world size pairs")
parser.add_argument("--max_tokens_per_micro_batch", type=int, default=0,
                    help="> 0: balance each global batch's tokens over ranks and pack each rank's share into micro-batches "
                         "of at most this many tokens (both sides of a pair count; the global batch keeps its pairs)")
# Tulu 3 8B used 5e-7 for ~2,100 steps of 128 pairs. The embedded run is 6 steps of 8 pairs on a 135M model: at 5e-6
# its loss goes from ln 2 to 0.62 (reward accuracy 1.0 from step 2; 8 steps of 16 pairs reach ~0.49), no collapse;
# 5e-7 would barely move it.
parser.add_argument("--learning_rate", type=float, default=5e-6)
parser.add_argument("--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant"])
parser.add_argument("--warmup_ratio", type=float, default=0.1)
parser.add_argument("--weight_decay", type=float, default=0.0)
parser.add_argument("--clip_grad_norm", type=float, default=1.0,
                    help="clip the global grad norm to this (Tulu 3's DeepSpeed runs clipped at 1.0: see sft.py); <= 0: off")
parser.add_argument("--num_train_epochs", type=int, default=1)
parser.add_argument("--max_steps", type=int, default=-1, help="> 0 overrides --num_train_epochs")
parser.add_argument("--seed", type=int, default=123)
parser.add_argument("--gradient_checkpointing", action="store_true")
parser.add_argument("--mixed_precision", default=None, choices=["bf16", "no"],
                    help="bf16: compute in bf16 on fp32 master weights; default bf16 on CUDA, no (all fp32) on CPU")
# outputs
parser.add_argument("--output_dir", default=os.path.join(ROOT, "out", "dpo"))
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
parser.add_argument("--use_lora", default="False", choices=["False", "false"], help="Tulu 3 passed False; no LoRA here")
args = parser.parse_args()
# stored in each checkpoint: a resume continues the same run (its flags, and the global batch in examples)
run_settings = vars(args) | {"global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps
                                             * int(os.environ.get("WORLD_SIZE", 1))}
# every flag in its range (beta > 0: a negative one trains toward the rejected answers), --output_dir free of another
# run's checkpoints; with --resume, the checkpoint to continue
resume_from = common.check_args(parser, args, run_settings, count_or_all=["keep_last_n_checkpoints"],
                                at_least_one=["max_seq_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                                              "num_train_epochs"],
                                at_least_zero=["learning_rate", "weight_decay", "max_tokens_per_micro_batch", "gamma_beta_ratio"],
                                above_zero=["beta"], fraction=["warmup_ratio"])
if not 0 <= args.label_smoothing < 0.5:  # (0.5 and past it: the loss pushes toward the rejected answers)
    parser.error(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
common.require_model_directory(args.model_name_or_path, args.tokenizer_name)
common.require_trackers(args.with_tracking, args.report_to)
beta = args.beta if args.beta is not None else {"dpo_norm": 5.0, "dpo": 0.1, "simpo": 2.0}[args.loss_type]

# ----------------------------------------------------------------------------- Distributed setup

use_cuda = torch.cuda.is_available()
# torchrun's group, or for a plain `python dpo.py` a group of one, so the FSDP code below is the same everywhere
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


def preference_pair(where, row):
    """A row's (chosen, rejected) conversations, each the shared prompt turns + one final assistant response. Tulu's
    schema has the prompt inside both; TRL's may give `prompt` (a message list or a string) and responses alone."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        common.check_messages(prompt, where, "prompt")
    elif prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{where}: field 'prompt' must be a string or a list of messages")
    sides = []
    for field in ("chosen", "rejected"):
        messages = row.get(field)
        common.check_messages(messages, where, field)
        if prompt is not None and all(m["role"] == "assistant" for m in messages):  # the response alone: prepend
            messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + messages
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: field '{field}' must end with an assistant response")
        if not any(m["role"] == "user" for m in messages[:-1]):  # e.g. responses alone and no (or a null) 'prompt'
            raise ValueError(f"{where}: field '{field}' has no user turn before its response, and the row no 'prompt': "
                             f"a preference needs the prompt it answers")
        sides.append(messages)
    chosen, rejected = sides
    if chosen[:-1] != rejected[:-1]:
        turn = next((i for i, (c, r) in enumerate(zip(chosen[:-1], rejected[:-1])) if c != r), min(len(chosen), len(rejected)) - 1)
        raise ValueError(f"{where}: fields 'chosen' and 'rejected' have different prompts (they differ at turn {turn})")
    if isinstance(prompt, list) and prompt != chosen[:-1]:
        raise ValueError(f"{where}: field 'prompt' is not the turns before the response in 'chosen'")
    if isinstance(prompt, str) and prompt.strip() not in [m["content"].strip() for m in chosen[:-1] if m["role"] == "user"]:
        raise ValueError(f"{where}: field 'prompt' matches no user turn of 'chosen'")
    return chosen, rejected


def tokenize(pair):
    """(chosen, rejected) -> two (input_ids, labels), labels only on the final response y (its content and end-of-turn
    token): earlier assistant turns belong to the prompt x that both sides share."""
    sides = []
    for messages in pair:
        input_ids, labels = common.tokenize_conversation(tokenizer, messages)
        trained = [t for t, label in enumerate(labels) if label != -100]
        start = trained[-1] if trained else len(labels)
        while start > 0 and labels[start - 1] != -100:  # back to the start of the last run of trained tokens
            start -= 1
        sides.append((input_ids, [-100] * start + labels[start:]))
    return sides


def dpo_example(where, row):
    """(reason, columns) of one preference row for common.tokenize_once: a bad row raises ValueError naming the field."""
    pair = preference_pair(where, row)
    chosen, rejected = tokenize(pair)
    reasons = ("special text",) if any(special_text.search(m["content"]) for side in pair for m in side) else ()
    truncated = max(len(chosen[0]), len(rejected[0])) > args.max_seq_length
    if truncated and args.overlong == "drop":
        return reasons + ("overlong",), None
    chosen, rejected = [(ids[: args.max_seq_length], labels[: args.max_seq_length]) for ids, labels in (chosen, rejected)]
    if any(all(label == -100 for label in labels[1:]) for _, labels in (chosen, rejected)):  # a response truncated away
        return reasons + ("untrained",), None
    if chosen == rejected:  # the same response (or the same after the cut): no preference, its margin is 0 for any
        return reasons + ("identical",), None  # policy; open-instruct trains it at loss ln 2 with zero gradient
    columns = {"chosen_input_ids": chosen[0], "chosen_labels": chosen[1],
               "rejected_input_ids": rejected[0], "rejected_labels": rejected[1]}
    return reasons + ("truncated",) * truncated, columns  # (a pair dropped after the cut is counted there only)


# Tokenized once per machine into a memory-mapped Arrow file, which every later run, rank and --resume reads:
# read_pair_rows(ids) reads pairs from it; lengths (N,) int32 (tokens of both sides) is all that is held in memory.
# Its key is what the pairs depend on besides the data ("ties dropped": not a file written before ties were dropped).
read_pair_rows, lengths, data_stats = common.tokenize_once(
    args.dataset_mixer_list, dpo_example, ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"],
    key=["dpo", "ties dropped", common.tokenizer_fingerprint(tokenizer), tokenizer.chat_template, args.max_seq_length,
         args.overlong],
    cache_dir=args.dataset_local_cache_dir, num_workers=args.preprocessing_num_workers)


def read_pairs(ids):
    """[((chosen ids, labels), (rejected ids, labels))] of pair ids, read from the memory-mapped file."""
    return [((r["chosen_input_ids"], r["chosen_labels"]), (r["rejected_input_ids"], r["rejected_labels"]))
            for r in read_pair_rows(ids)]


global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
steps_per_epoch = len(lengths) // global_batch_size
if steps_per_epoch == 0:
    raise ValueError(f"{len(lengths)} usable pairs do not fill one global batch of {global_batch_size}")
if 0 < args.max_tokens_per_micro_batch < 2 * args.max_seq_length:
    raise ValueError(f"--max_tokens_per_micro_batch {args.max_tokens_per_micro_batch} < 2 x --max_seq_length (a pair)")
total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
counts = collections.Counter(data_stats["counts"])
print0(f"{data_stats['rows']} rows -> {len(lengths)} pairs ({counts['overlong']} dropped with a side longer than "
       f"{args.max_seq_length} tokens, {counts['truncated']} truncated, {counts['untrained']} dropped with a response "
       f"truncated away, {counts['identical']} with identical responses, {counts['special text']} with a special "
       f"token's text in a message, tokenized as that token); {data_stats['how']} {data_stats['path']}; "
       f"global batch {global_batch_size} pairs, {steps_per_epoch} steps per epoch, {total_steps} steps; "
       f"{args.loss_type}, beta {beta}")


def global_batch(step):
    """The pair ids of optimizer step `step`: a fresh seeded shuffle every epoch, so a resumed run sees the same data."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    return order[index * global_batch_size : (index + 1) * global_batch_size]


# ----------------------------------------------------------------------------- Model

common.register_packed_attention()
config = AutoConfig.from_pretrained(args.model_name_or_path)
# bf16: compute in bf16, keep fp32 master weights and reduce gradients in fp32. Otherwise everything fp32.
mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()


def sharded_model(gradient_checkpointing):
    """Built on the meta device, sharded per decoder block, then only this rank's shards materialized; rank 0 alone
    reads the checkpoint and broadcasts it: an 8B model never sits whole in every rank's memory (same as sft.py)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="packed")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    common.refuse_packing(model, min(int(max(lengths)), args.max_seq_length), "dpo.py packs: a shorter --max_seq_length?")
    for blocks in common.decoder_layers(model):
        fully_shard(blocks, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    common.materialize(model, device)  # real storage for this rank's shards; non-persistent buffers computed
    full_state_dict = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).state_dict() if rank == 0 else {}
    set_model_state_dict(model, full_state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return common.disable_dropout(model)  # (the policy's log-probs are compared with the reference's)


model = sharded_model(args.gradient_checkpointing)
model.generation_config = common.generation_config(args.model_name_or_path)  # saved with it: its stop ids, as given
# --no_cache_ref: the reference is a second, frozen copy of the initial model (twice the weights, a forward per step)
use_reference = args.loss_type != "simpo"  # SimPO needs no reference model at all
live_reference = args.no_cache_ref and use_reference
reference_model = sharded_model(False).eval().requires_grad_(False) if live_reference else None
for m in filter(None, (model, reference_model)):
    common.wrap_token_logps(m)
n_params = sum(p.numel() for p in model.parameters())
print0(f"{args.model_name_or_path}: {n_params / 1e6:.1f}M parameters, world size {world_size}, reference: "
       f"{'none' if not use_reference else 'live (frozen copy)' if live_reference else 'cached log-probs'}")


def response_logps(model, batch_pairs):
    """Summed log-probs log pi(y|x) of the chosen and the rejected responses of `batch_pairs` (read_pairs), (B,) each,
    from ONE padding-free forward: the B chosen and B rejected documents packed into a single row."""
    documents = [chosen for chosen, _ in batch_pairs] + [rejected for _, rejected in batch_pairs]  # 2B (ids, labels)
    inputs, targets = common.collate(documents, True, tokenizer.pad_token_id or 0, device)  # (1, T) each
    token_logps = model.token_logps(inputs, targets)[0]  # (T,), never the whole (T, V) fp32 logits
    return common.document_logps(token_logps, inputs["cu_seq_lens_q"]).chunk(2)  # (B,), (B,)


# ----------------------------------------------------------------------------- Reference log-probs

def compute_reference_logps():
    """(N, 2) summed log-probs of every pair's chosen and rejected response under the initial model. Each rank scores
    a contiguous slice of the pairs and all_gather joins them; FSDP needs every rank in every forward (each one
    all-gathers the weights), so short slices are padded with repeats of pair 0 and the extra rows dropped."""
    per_rank = math.ceil(len(lengths) / world_size)
    mine = list(range(rank * per_rank, min(len(lengths), (rank + 1) * per_rank)))
    mine += [0] * (per_rank - len(mine))
    slice_logps = torch.zeros(per_rank, 2, device=device)
    model.eval()
    with torch.no_grad():
        for b in tqdm(range(0, per_rank, args.per_device_train_batch_size), disable=rank != 0, desc="reference log-probs"):
            chosen, rejected = response_logps(model, read_pairs(mine[b : b + args.per_device_train_batch_size]))
            slice_logps[b : b + len(chosen)] = torch.stack([chosen, rejected], 1)
    # FSDP2 keeps the root's parameters unsharded after a forward until the backward reshards them; with no backward
    # they would stay that way, and the optimizer (built next) would be handed the unsharded tensors.
    model.reshard()
    model.train()
    gathered = [torch.zeros_like(slice_logps) for _ in range(world_size)]
    dist.all_gather(gathered, slice_logps)
    return torch.cat(gathered)[: len(lengths)]  # (N, 2), row i = pair i on every rank


# The reference is the initial model, so a --resume needs the same one (rank 0 reads and keys the weights)
weights_key = (common.weights_key(args.model_name_or_path) if rank == 0 and use_reference and
               (not live_reference or args.checkpointing_steps not in (None, "0") or resume_from) else None)  # (~12 s, 8B)
if resume_from:
    common.check_resumed_reference(resume_from, weights_key, device)
# Before any checkpoint is loaded, so the model here is the initial one even when resuming. Rank 0 alone reads and
# writes the cache and tells the others, so a cache on one node's local disk works for a multi-node run.
ref_logps = None
if use_reference and not live_reference:
    # keyed by what the reference log-probs depend on: the initial weights, the tokenized pairs (their file's name is a
    # key of the data, chat template, tokenizer, max length and truncation) and the compute dtype; not the loss, batch
    # size or world size
    reference_key = hashlib.sha256(json.dumps([weights_key, os.path.basename(data_stats["path"]), str(mp_policy.param_dtype)]).encode())
    cache_path = os.path.join(args.ref_cache_dir, f"{reference_key.hexdigest()[:20]}.pt") if rank == 0 else None
    cached = None
    if rank == 0 and os.path.exists(cache_path):
        try:
            cached = torch.load(cache_path)["ref_logps"]
            if cached.shape != (len(lengths), 2):
                raise ValueError(f"{tuple(cached.shape)} for {len(lengths)} pairs")
        except Exception as e:  # damaged since it was written (a copy cut short): it stopped the run with a bare EOFError
            print(f"warning: {cache_path} is unreadable ({type(e).__name__}: {e}): computing it again", flush=True)
            cached = None
    hit = torch.tensor(int(cached is not None), device=device)
    dist.broadcast(hit, 0)
    if hit:
        ref_logps = cached.to(device) if rank == 0 else torch.empty(len(lengths), 2, device=device)
        dist.broadcast(ref_logps, 0)
        print0(f"reference log-probs: cache hit, {cache_path}")
    else:
        start_time = time.time()
        ref_logps = compute_reference_logps()
        print0(f"reference log-probs: computed for {len(lengths)} pairs in {time.time() - start_time:.1f} s")
        if rank == 0:  # a cache that cannot be written (a full disk) costs the next run this pass (it stopped this run)
            temp = f"{cache_path}.{os.getpid()}.tmp"  # (its own: another run may be writing the same key)
            try:
                os.makedirs(args.ref_cache_dir, exist_ok=True)
                torch.save({"ref_logps": ref_logps.cpu(), "model": args.model_name_or_path}, temp)
                os.replace(temp, cache_path)  # never a half-written cache, even if killed here
                print(f"reference log-probs: cached in {cache_path}", flush=True)
            except (OSError, RuntimeError) as e:
                print(f"warning: reference log-probs not cached in {args.ref_cache_dir} ({type(e).__name__}: {e})", flush=True)
                if os.path.exists(temp):
                    os.remove(temp)

# ----------------------------------------------------------------------------- Loss

def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths):
    """Per-pair losses and implicit rewards, (B,) each, from summed response log-probs and response lengths |y|."""
    if args.loss_type == "dpo":  # DPO (Rafailov et al. 2023, eq. 7): reward beta * log pi(y|x)/ref(y|x)
        chosen_rewards = beta * (policy_chosen - ref_chosen)
        rejected_rewards = beta * (policy_rejected - ref_rejected)
    elif args.loss_type == "dpo_norm":  # Tulu 3: the same per token, so long responses do not dominate the margin
        chosen_rewards = beta * (policy_chosen - ref_chosen) / chosen_lengths
        rejected_rewards = beta * (policy_rejected - ref_rejected) / rejected_lengths
    else:  # SimPO (Meng et al. 2024, eq. 6): reward beta/|y| * log pi(y|x), no reference at all
        chosen_rewards = beta * policy_chosen / chosen_lengths
        rejected_rewards = beta * policy_rejected / rejected_lengths
    margin = chosen_rewards - rejected_rewards  # z: the Bradley-Terry logit of "chosen is better"
    if args.loss_type == "simpo":
        margin = margin - args.gamma_beta_ratio * beta  # SimPO's target reward margin gamma
    # Conservative DPO (Mitchell 2023): a label is wrong with probability eps, L = -(1-eps) log s(z) - eps log s(-z)
    losses = -(1 - args.label_smoothing) * F.logsigmoid(margin) - args.label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=use_cuda)
warmup_steps = math.ceil(args.warmup_ratio * total_steps)  # then linear / cosine decay to 0, or constant


# MFU: dense bf16 peak 989 TFLOP/s per H100 / H200 GPU (the policy's training alone: a live reference is overhead)
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
    common.finish_checkpoint(path, {"step": step, "run": run_settings, "reference": weights_key}, args.keep_last_n_checkpoints)


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
track = common.start_tracking(args.report_to, args.output_dir, "dpo", vars(args), start_step) if args.with_tracking else None
checkpoint_every = steps_per_epoch if args.checkpointing_steps == "epoch" else int(args.checkpointing_steps or 0)

# ----------------------------------------------------------------------------- Training loop

model.train()
progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=rank != 0, desc="dpo")
for step in progress:
    step_start = time.time()
    batch = global_batch(step)  # pair ids of the whole global batch, the same list on every rank
    # The loss is the mean over the pairs of the global batch: each rank's sum over its pairs / global batch size,
    # times world_size because FSDP averages gradients over ranks.
    loss_scale = world_size / len(batch)
    shares = common.micro_batch_shares(batch, lengths, world_size, args.per_device_train_batch_size,
                                       args.gradient_accumulation_steps, args.max_tokens_per_micro_batch)
    mine = shares[rank]
    rank_tokens = [sum(int(lengths[i]) for micro_batch in share for i in micro_batch) for share in shares]
    # sums over this rank's pairs: loss, rewards chosen / rejected, accuracy, logps chosen / rejected; then tokens
    sums, input_tokens, attended = torch.zeros(6, dtype=torch.float64, device=device), 0, 0
    for m, micro_batch in enumerate(mine):
        model.set_requires_gradient_sync(m == len(mine) - 1)  # reduce-scatter once per step, not per micro-step
        # an empty micro-batch (a rank with fewer pairs than micro-steps) runs the first pair of the batch with a zero
        # loss weight: FSDP needs every rank in every forward and backward
        weight = 1.0 if micro_batch else 0.0
        micro_batch = micro_batch or batch[:1]
        batch_pairs = read_pairs(micro_batch)
        pair_ids = torch.tensor(micro_batch, device=device)  # (B,)
        policy_chosen, policy_rejected = response_logps(model, batch_pairs)  # (B,), (B,)
        if not use_reference:
            ref_chosen = ref_rejected = None
        elif live_reference:
            with torch.no_grad():
                ref_chosen, ref_rejected = response_logps(reference_model, batch_pairs)
        else:
            ref_chosen, ref_rejected = ref_logps[pair_ids].unbind(1)  # looked up by pair id, never by step
        # |y|: the scored tokens of each response, (B, 2) for chosen and rejected
        response_lengths = torch.tensor([[sum(label != -100 for label in labels[1:]) for _, labels in pair]
                                         for pair in batch_pairs], dtype=torch.float32, device=device)
        losses, chosen_rewards, rejected_rewards = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                                   response_lengths[:, 0], response_lengths[:, 1])
        (losses.sum() * loss_scale * weight).backward()
        sums += weight * torch.stack([losses.sum().detach(), chosen_rewards.sum(), rejected_rewards.sum(),
                                      (chosen_rewards > rejected_rewards).sum(), policy_chosen.sum().detach(),
                                      policy_rejected.sum().detach()]).double()
        input_tokens += weight * sum(len(side[0]) for pair in batch_pairs for side in pair)
        attended += weight * sum(len(side[0]) ** 2 for pair in batch_pairs for side in pair)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm if args.clip_grad_norm > 0 else float("inf"))
    lr = common.learning_rate(step, args.learning_rate, warmup_steps, total_steps, args.lr_scheduler_type)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    totals = torch.cat([sums, torch.tensor([input_tokens, attended], dtype=torch.float64, device=device)])
    dist.all_reduce(totals)
    means = (totals[:6] / len(batch)).tolist()  # over the pairs of the global batch
    # rewards/*: the implicit rewards the loss compares (per token for dpo_norm and simpo); logps/*: log pi(y|x) summed
    # over the response; tokens: every token of both sequences of every pair, what the forward passes process.
    elapsed = time.time() - step_start
    metrics = dict(step=step + 1, epoch=step // steps_per_epoch, loss=means[0], lr=lr,
                   grad_norm=grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else grad_norm.item(),
                   **{"rewards/chosen": means[1], "rewards/rejected": means[2], "rewards/accuracy": means[3],
                      "rewards/margin": means[1] - means[2], "logps/chosen": means[4], "logps/rejected": means[5]},
                   tokens=int(totals[6].item()), tokens_per_sec=totals[6].item() / elapsed, micro_steps=len(mine),
                   rank_token_imbalance=max(rank_tokens) / (sum(rank_tokens) / world_size))  # 1.0: every rank as busy
    if peak_flops:
        metrics["mfu"] = common.training_flops(config, n_params, totals[6].item(), totals[7].item()) / elapsed / (peak_flops * world_size)
    common.append_log(metrics_path, [metrics], track)  # (rank 0's, to its tracker too)
    progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{means[3]:.2f}", tok_s=f"{metrics['tokens_per_sec']:.0f}")
    if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
        save_checkpoint(step + 1)

# ----------------------------------------------------------------------------- Save

# An ordinary HF directory (bf16 when trained in bf16) with the tokenizer and its chat template, gathered on rank 0:
# transformers and vLLM load it as they would any released model.
common.save_model(model, tokenizer, args.output_dir, torch.bfloat16 if bf16 else torch.float32)
dist.destroy_process_group()
