"""
Reinforcement learning with verifiable rewards (RLVR): stage 3 of the Tulu 3 recipe.

Sample responses to prompts, score them with a verifier (GSM8K last number, MATH flex, IFEval constraint), and push
the policy toward high reward: GRPO (Tulu 3.1, default) or PPO with a value model (Tulu 3). Generation runs in vLLM
colocated in every torchrun rank when vLLM and CUDA are present, else in a plain HF copy of the policy; either way the
generator gets the policy's full weights after every optimizer step and a self-check compares their log-probs.

On a laptop CPU, the embedded defaults (SmolLM2-135M-Instruct on data/rlvr_train.jsonl, GSM8K + IF constraints):
    python rlvr.py
One node of 8 GPUs, Tulu 3.1's 8B GRPO (48 prompts x 16 samples, 2 optimizer steps per rollout; the step count is illustrative):
    torchrun --nproc_per_node 8 rlvr.py --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-DPO --chat_template tulu \
        --dataset_mixer_list allenai/RLVR-GSM-MATH-IF-Mixed-Constraints 1.0 --algo grpo --num_samples_per_prompt 16 \
        --num_unique_prompts_rollout 48 --num_mini_batches 2 --per_device_train_batch_size 2 --response_length 2048 --beta 0.01 \
        --max_prompt_token_length 2048 --learning_rate 5e-7 --lr_scheduler_type constant --weight_decay 0.01 --temperature 1.0 \
        --max_steps 1000 --non_stop_penalty --penalty_reward_value 0 --vllm_gpu_memory_utilization 0.4 --output_dir output/rlvr_8b
Tulu 3's 8B PPO instead: --algo ppo --num_unique_prompts_rollout 224 --num_samples_per_prompt 1 --num_mini_batches 1 --num_epochs 4
    --beta 0.05 --learning_rate 3e-7 --lr_scheduler_type linear --max_steps 44642 --penalty_reward_value -10; see the README.
"""
import argparse
import importlib.util
import math
import os
import re
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer, GenerationConfig

import common

ROOT = os.path.dirname(os.path.abspath(__file__))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# model and data
parser.add_argument("--model_name_or_path", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
parser.add_argument("--tokenizer_name", default=None, help="defaults to --model_name_or_path")
parser.add_argument("--chat_template", default="default", choices=["default", "tulu"], help="default: the tokenizer's own")
parser.add_argument("--dataset_mixer_list", nargs="+", default=[os.path.join(ROOT, "data", "rlvr_train.jsonl"), "1.0"],
                    help="SOURCE WEIGHT pairs of Tulu RLVR rows (messages, ground_truth, dataset)")
parser.add_argument("--eval_dataset", default=os.path.join(ROOT, "data", "rlvr_heldout.jsonl"))
parser.add_argument("--eval_every", type=int, default=0, help="greedy held-out reward at step 0, every N steps and at the end; 0: off")
parser.add_argument("--eval_batch_size", type=int, default=32, help="HF generator: rows per generate call")
parser.add_argument("--max_prompt_length", "--max_prompt_token_length", type=int, default=512, help="longer prompts are dropped")
parser.add_argument("--preprocessing_num_workers", type=int, default=min(8, os.cpu_count()))
parser.add_argument("--dataset_local_cache_dir", default=os.path.join(ROOT, "cache", "tokenized"), help="prompts, tokenized once")
# RL (Tulu / open-instruct flag names)
parser.add_argument("--algo", default="grpo", choices=["grpo", "ppo"])
parser.add_argument("--num_unique_prompts_rollout", type=int, default=2, help="prompts per step (all ranks together; Tulu 3.1 GRPO: 48, Tulu 3 PPO: 224)")
parser.add_argument("--num_samples_per_prompt", "--num_samples_per_prompt_rollout", type=int, default=4, help="GRPO group size (Tulu 3.1: 16)")
parser.add_argument("--response_length", type=int, default=96, help="max new tokens per response (Tulu: 2048)")
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--verification_reward", type=float, default=10.0, help="reward = this x verifier score")
parser.add_argument("--non_stop_penalty", action="store_true", help="reward a response without eos --penalty_reward_value")
parser.add_argument("--penalty_reward_value", type=float, default=-10.0, help="Tulu 3 PPO: -10; Tulu 3.1 GRPO: 0")
parser.add_argument("--beta", type=float, default=0.01, help="KL to the reference (Tulu 3.1 GRPO 0.01, Tulu 3 PPO 0.05)")
parser.add_argument("--cliprange", type=float, default=0.2)
parser.add_argument("--num_epochs", type=int, default=1, help="passes over each rollout batch (PPO epochs)")
parser.add_argument("--num_mini_batches", type=int, default=1, help="optimizer steps per epoch of a rollout batch")
parser.add_argument("--per_device_train_batch_size", type=int, default=4, help="sequences per packed micro-batch")
parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute each block in backward (policy, value)")
parser.add_argument("--mixed_precision", choices=["bf16", "no"], help="bf16 compute, fp32 master weights; default bf16 on CUDA only")
parser.add_argument("--gamma", type=float, default=1.0, help="PPO: GAE discount")
parser.add_argument("--lam", type=float, default=0.95, help="PPO: GAE lambda")
parser.add_argument("--vf_coef", type=float, default=0.1, help="PPO: value loss weight")
parser.add_argument("--cliprange_value", type=float, default=0.2, help="PPO: value clipping")
# optimization
# Tulu 3.1: 5e-7 for 8B over 1000s of steps; a 135M model barely moves at that rate in a few dozen steps, hence 1e-5
parser.add_argument("--learning_rate", type=float, default=1e-5)
parser.add_argument("--lr_scheduler_type", default="constant", choices=["constant", "linear"])
parser.add_argument("--weight_decay", type=float, default=0.0, help="AdamW's (policy and value); Tulu 3's and 3.1's runs had 0.01")
parser.add_argument("--max_grad_norm", type=float, default=1.0, help="<= 0: off (as sft.py's --clip_grad_norm)")
parser.add_argument("--max_steps", type=int, default=6, help="rollout steps")
parser.add_argument("--seed", type=int, default=1)
# generation backend
parser.add_argument("--generator", default="auto", choices=["auto", "vllm", "hf"], help="auto: vllm if it imports and CUDA is up")
parser.add_argument("--generator_dtype", default=None, choices=["bfloat16", "float32"], help="default: bfloat16 under bf16 mixed precision")
parser.add_argument("--vllm_tensor_parallel_size", type=int, default=1)
parser.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.3)
parser.add_argument("--self_check_tolerance", type=float, help="max |generator - policy| log-prob; default 1e-4 fp32, 0.5 bf16")
parser.add_argument("--debug_skip_weight_sync", action="store_true", help="TESTING ONLY: never update the generator")
parser.add_argument("--save_rollouts", action="store_true", help="write every sample with its per-token tensors to rollouts.jsonl")
# outputs
parser.add_argument("--output_dir", default=os.path.join(ROOT, "out", "rlvr"))
parser.add_argument("--checkpointing_steps", type=int, default=0, help="save a resumable checkpoint every N steps")
parser.add_argument("--keep_last_n_checkpoints", type=int, default=2)
parser.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"], help="continue from the newest checkpoint; auto: if any")
parser.add_argument("--with_tracking", action="store_true", help="also log metrics.jsonl's metrics to --report_to")
parser.add_argument("--report_to", default="all", choices=["all", "tensorboard", "wandb"], help="all: both; W&B offline")
args = parser.parse_args()
# flags in range, no other run's checkpoints in --output_dir; --resume: the checkpoint, whose stored flags must be these
resume_from = common.check_args(parser, args, vars(args), count_or_all=["keep_last_n_checkpoints"], at_least_one=[
    "max_steps", "num_unique_prompts_rollout", "num_samples_per_prompt", "response_length", "num_epochs", "num_mini_batches",
    "per_device_train_batch_size", "eval_batch_size", "max_prompt_length", "vllm_tensor_parallel_size"],
    at_least_zero=["learning_rate", "beta", "weight_decay", "vf_coef", "eval_every", "checkpointing_steps"],
    above_zero=["temperature", "cliprange", "cliprange_value", "self_check_tolerance"], fraction=["gamma", "lam", "vllm_gpu_memory_utilization"])
ppo_only = [f"--{name}" for name in ("gamma", "lam", "vf_coef", "cliprange_value")
            if getattr(args, name) != parser.get_default(name)]
if args.algo == "grpo" and (args.num_samples_per_prompt < 2 or ppo_only):  # (PPO's flags were silently ignored)
    parser.error(f"GRPO has no value model: {', '.join(ppo_only)} are PPO's (--algo ppo)" if ppo_only else
                 "GRPO compares samples of one prompt: --num_samples_per_prompt must be >= 2")
if args.generator == "vllm" and not importlib.util.find_spec("vllm"):
    parser.error("--generator vllm: vllm does not import here (on a GPU: pip install vllm==0.32.0; or --generator hf)")
common.require_model_directory(args.model_name_or_path, args.tokenizer_name, value_model=args.algo == "ppo")
common.require_trackers(args.with_tracking, args.report_to)

# ----------------------------------------------------------------------------- Distributed setup

use_cuda = torch.cuda.is_available()
# torchrun's group, or for a plain `python rlvr.py` a group of one, so the FSDP code below is the same everywhere
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
P, G = args.num_unique_prompts_rollout, args.num_samples_per_prompt
if P % (args.num_mini_batches * world_size):
    raise ValueError(f"--num_unique_prompts_rollout {P} must be divisible by --num_mini_batches x world size")

# ----------------------------------------------------------------------------- Data

tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
common.set_chat_template(tokenizer, args.chat_template)
eos_ids = common.stop_token_ids(tokenizer, args.model_name_or_path)  # the eos and the model's other stop ids (<|eot_id|>)
common.claim_output_dir(args.output_dir, args.model_name_or_path)  # checks passed: the run takes it (not while another runs there)
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def prompt_example(where, row):
    """A Tulu RLVR row -> (reasons, {prompt_ids, ground_truth, dataset, question}); a bad row: ValueError naming
    file:line, field. The question (the last user turn) is what the verifier reads besides the response."""
    common.check_messages(row.get("messages"), where)
    dataset = row.get("dataset")
    if not isinstance(dataset, str) or dataset.lower() not in ("gsm8k", "math", "ifeval"):
        raise ValueError(f"{where}: field 'dataset' must be one of gsm8k, math, ifeval (it picks the verifier), got {dataset!r}")
    try:  # a gold no response can match is a bad row (common.ground_truth_text), not a prompt that silently trains nothing
        truth = common.ground_truth_text(dataset, row.get("ground_truth"))
    except ValueError as e:
        raise ValueError(f"{where}: field 'ground_truth' {e}") from None
    # The prompt: every turn up to the last user turn; a final assistant turn is a reference answer, left out
    messages = row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" else row["messages"]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{where}: field 'messages' must end with a user turn (then at most one assistant reference "
                         f"answer), got roles {[m['role'] for m in row['messages']]}")
    ids = tokenizer(common.render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False).input_ids
    if len(ids) > args.max_prompt_length:
        return "overlong", None
    return (), dict(prompt_ids=ids, ground_truth=truth, dataset=dataset.lower(), question=messages[-1]["content"])


def load_prompts(sources):
    """-> read(ids) -> [{prompt_ids, ground_truth, dataset, question}], and the count: tokenized once into an Arrow file."""
    read, lengths, stats = common.tokenize_once(
        sources, prompt_example, ["prompt_ids", "ground_truth", "dataset", "question"],
        key=["rlvr", common.tokenizer_fingerprint(tokenizer), tokenizer.chat_template, args.max_prompt_length],
        cache_dir=args.dataset_local_cache_dir, num_workers=args.preprocessing_num_workers)
    print0(f"{sources[0]}...: {len(lengths)} prompts ({stats['counts'].get('overlong', 0)} dropped as too long); {stats['how']} {stats['path']}")
    return read, len(lengths)


read_train_prompts, n_train_prompts = load_prompts(args.dataset_mixer_list)  # read_train_prompts(ids) -> [prompt dict]
read_eval_prompts, n_eval = load_prompts([args.eval_dataset, "1.0"]) if args.eval_every > 0 else (lambda ids: [], 0)
eval_prompts = read_eval_prompts(range(n_eval))  # a small held-out set, read once
if n_train_prompts < P:
    raise ValueError(f"{n_train_prompts} prompts do not fill one rollout of {P}")
steps_per_epoch = n_train_prompts // P


def rollout_prompts(step):
    """Global prompt indices of step `step`: a fresh seeded shuffle per epoch, so a resumed run sees the same prompts."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(n_train_prompts, generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    return order[index * P : (index + 1) * P]


# ----------------------------------------------------------------------------- Models

common.register_packed_attention()
mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()


def build_fsdp_model(auto_class, config, zero_head=False):
    """Meta-device init, FSDP2 per block then root, rank 0 reads the checkpoint and broadcasts it (as in sft.py)."""
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=torch.float32, attn_implementation="packed")
    if args.gradient_checkpointing:  # (the reference runs without grad: nothing to recompute there)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    common.refuse_packing(model, args.max_prompt_length + args.response_length, "rlvr.py packs: shorter prompts or responses?")
    for blocks in common.decoder_layers(model):
        fully_shard(blocks, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    common.materialize(model, device)  # real storage for this rank's shards; non-persistent buffers computed
    state = {}
    if rank == 0:
        state = auto_class.from_pretrained(args.model_name_or_path, config=config, dtype=torch.float32).state_dict()
        if zero_head:  # the value head starts at 0: V = 0 everywhere, so the first advantages are the rewards-to-go
            state["score.weight"].zero_(), state["score.bias"].zero_()
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if auto_class is AutoModelForCausalLM:
        common.wrap_token_logps(model)  # model.token_logps: log-probs and entropies without the full (T, V) logits
    # no dropout (in the blocks, the value head), which would make the first ratio differ from 1; HF recomputes a block
    # only in train mode: the blocks alone go back to it, with their dropout off
    model.eval().model.layers.train(args.gradient_checkpointing)
    return common.disable_dropout(model)


config = AutoConfig.from_pretrained(args.model_name_or_path)
policy = build_fsdp_model(AutoModelForCausalLM, config)
policy.generation_config = common.generation_config(args.model_name_or_path)  # saved with it: its stop ids, as given
optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=use_cuda)
# The frozen reference only serves the KL term: with --beta 0 it is not even built.
reference = build_fsdp_model(AutoModelForCausalLM, config).requires_grad_(False) if args.beta > 0 else None
# the initial weights' key, stored in each checkpoint: a --resume needs the same reference (~12 s for 8B: only then)
weights_key = common.weights_key(args.model_name_or_path) if rank == 0 and reference and (args.checkpointing_steps or resume_from) else None
value_model = value_optimizer = None
if args.algo == "ppo":  # Tulu 3 initializes the value model from a reward model; we start from the policy's backbone
    value_config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=1)
    value_model = build_fsdp_model(AutoModelForTokenClassification, value_config, zero_head=True)
    value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=use_cuda)
print0(f"{args.model_name_or_path}: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, world size "
       f"{world_size}, algo {args.algo}, reference {'yes' if reference else 'no (beta 0)'}")


def forward(model, samples, temperature=args.temperature):
    """One packed forward over samples -> per-response-token tensors (N,), in sample order. Causal LM: (log-probs under
    logits / temperature, what the generator sampled from; entropies) via common.token_logps. Value model: (values, None)."""
    inputs, targets = common.collate([(s["input_ids"], s["labels"]) for s in samples], True, pad_id, device)
    mask = targets[0] != -100  # (T,) positions that predict a response token
    if model is value_model:
        return model(**inputs).logits[0][mask][:, 0].float(), None  # (N,)
    logps, entropy = model.token_logps(inputs, targets, temperature)  # (T,) each
    return logps[mask], entropy[mask]


# ----------------------------------------------------------------------------- Generation

# vLLM's engine must live in this process (not a V1 engine-core subprocess) for its weights to be reachable: set before import
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
backend = ("vllm" if use_cuda and importlib.util.find_spec("vllm") else "hf") if args.generator == "auto" else args.generator
gen_tp = args.vllm_tensor_parallel_size if backend == "vllm" else 1
gen_dtype = getattr(torch, args.generator_dtype or ("bfloat16" if bf16 else "float32"))
tolerance = args.self_check_tolerance or (0.5 if gen_dtype == torch.bfloat16 else 1e-4)
if backend == "vllm":
    # Written against vLLM 0.32.0's source, and tested on CPU against tests/fake_vllm (a stand-in); never run on a real vLLM.
    import vllm

    # external_launcher reads the torchrun variables even in one process (vllm/v1/executor/uniproc_executor.py:186-197);
    # it then joins our process group, which exists already, so MASTER_ADDR/PORT are only read, never used
    for key, value in dict(RANK=rank, LOCAL_RANK=local_rank, WORLD_SIZE=world_size, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500).items():
        os.environ.setdefault(key, str(value))
    # Ranks of one tensor-parallel group form one engine: they must send it identical requests (see group_share).
    llm = vllm.LLM(model=args.model_name_or_path, tensor_parallel_size=gen_tp, distributed_executor_backend="external_launcher",
                   gpu_memory_utilization=args.vllm_gpu_memory_utilization, enable_sleep_mode=True, seed=args.seed + rank // gen_tp,
                   max_model_len=args.max_prompt_length + args.response_length, dtype=str(gen_dtype).removeprefix("torch."))
    # The in-process engine's model, unwrapped from CUDA graphs (vllm/v1/worker/gpu_model_runner.py:3112-3120); it takes
    # load_weights([(hf_name, full_tensor)]) and stacks q/k/v and gate/up itself (vllm/model_executor/models/llama.py:348-357)
    generator = llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
else:
    generator = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=gen_dtype).to(device).eval().requires_grad_(False)
    # not the model's own generation_config.json, whose fields generate() fills in (a repetition_penalty: Qwen2.5's 1.05):
    # samples from softmax(logits / T) alone, the distribution the policy's log-probs are taken under
    generator.generation_config = GenerationConfig()


def generate(prompts_token_ids, samples_per_prompt=1, seeds=None):
    """-> flat list (prompt-major) of (response_token_ids, finished, generator_logps or None).

    seeds None: greedy. Otherwise prompt i is sampled from a generator seeded with seeds[i], so the same prompt gets the
    same samples whichever rank (and whichever batch) generates it. A response keeps its eos token when it has one."""
    if backend == "vllm":
        params = [vllm.SamplingParams(n=samples_per_prompt, temperature=0.0 if seeds is None else args.temperature,
                                      top_p=1.0, max_tokens=args.response_length, logprobs=0, stop_token_ids=eos_ids,
                                      seed=None if seeds is None else seeds[i]) for i in range(len(prompts_token_ids))]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts_token_ids], params, use_tqdm=False)
        # c.logprobs: per position, {token id: Logprob} with the sampled token's raw (temperature 1) log-prob
        return [(list(c.token_ids), c.finish_reason == "stop", [position[t].logprob for position, t in zip(c.logprobs, c.token_ids)])
                for output in outputs for c in output.outputs]
    # HF: one generate call per batch of prompts x samples, left-padded so each row continues from its last prompt token;
    # sampling is greedy on logits / T + Gumbel noise (the Gumbel-max trick: that argmax is a sample of softmax(logits / T)).
    greedy = GenerationConfig(do_sample=False, max_new_tokens=args.response_length, eos_token_id=eos_ids, pad_token_id=pad_id)
    per_call = max(1, args.eval_batch_size // samples_per_prompt)
    results = []
    for b in range(0, len(prompts_token_ids), per_call):
        group = range(b, min(b + per_call, len(prompts_token_ids)))
        rows = [prompts_token_ids[i] for i in group for _ in range(samples_per_prompt)]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
        noise = [torch.Generator(device).manual_seed(seeds[i]) for i in group] if seeds is not None else []
        gumbel = lambda _, scores: scores / args.temperature - torch.cat([  # (rows, V); -log E, E ~ Exp(1), is Gumbel
            torch.empty(samples_per_prompt, scores.shape[1], device=device).exponential_(generator=g) for g in noise]).log()
        with torch.no_grad():
            out = generator.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=greedy,
                                     logits_processor=[gumbel] if noise else None)
        for row in out[:, width:].tolist():  # (B, new tokens): cut after the first eos
            stop = next((t for t, token in enumerate(row) if token in eos_ids), None)
            results.append((row if stop is None else row[: stop + 1], stop is not None, None))
    return results


def checksum(tensor):
    """An exact, order-free fingerprint of a tensor's values: the sum of a nonlinear hash of each element's bits, in int64
    without overflow. A stack's checksum is the sum of its parts' (vLLM's qkv_proj, gate_up_proj; zero padding rows hash to
    0), and one element one ulp off changes it, where a float sum could round the difference away or cancel it."""
    total, p = 0, 2147483647
    for part in tensor.detach().flatten().split(1 << 24):  # int64 temporaries, 8 bytes per element: a chunk at a time
        bits = part.view(torch.int16 if part.element_size() == 2 else torch.int32).long() % p
        total += ((bits * 2654435761 % p) ** 2 % p).sum().item()
    return total


def sync_generator():
    """Push the policy's full weights into the generator, one tensor at a time: gather the FSDP shards (full_tensor, a
    collective), cast to the generator's dtype (else vLLM casts with a warning per tensor, vllm/model_executor/models/
    utils.py:324-339, from a copy twice the size), load. Then the exact self-check: every tensor's checksum must match."""
    asleep = backend == "vllm" and llm.llm_engine.is_sleeping()
    if asleep:  # the weights first, the KV cache after the load: the two never peak together
        llm.wake_up(tags=["weights"])
    sent = {}
    for name, param in policy.named_parameters():
        full = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().to(gen_dtype)
        if not args.debug_skip_weight_sync:
            generator.load_weights([(name, full)]) if backend == "vllm" else generator.get_parameter(name).data.copy_(full)
        if backend == "vllm":  # the engine's name for it: q/k/v and gate/up are stacked (vllm/model_executor/models/llama.py:348-357)
            name = re.sub(r"\.(gate|up)_proj\.", ".gate_up_proj.", re.sub(r"\.[qkv]_proj\.", ".qkv_proj.", name))
        sent[name] = sent.get(name, 0) + checksum(full)
    if asleep:  # sleeping dropped the prefix cache, whose blocks hold the old weights' keys (vllm/v1/engine/core.py:972)
        llm.wake_up(tags=["kv_cache"])
    if gen_tp > 1:  # each engine rank holds a shard of every stack: not compared (not implemented)
        return
    held = {name: checksum(p) for name, p in generator.named_parameters()}
    wrong = sorted(name for name in sent.keys() | held.keys() if sent.get(name) != held.get(name))
    count = torch.tensor(len(wrong), device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)  # every rank stops, not only the one whose engine is wrong
    if count.item():
        raise RuntimeError(f"generator self-check failed: after the weight sync, {count.item()} {backend} generator tensors do not "
                           f"hold what was sent (checksums differ: {', '.join(wrong[:3]) or 'on another rank'}): broken or skipped sync")


def self_check(sample):
    """Generator and policy must give a sampled sequence the same log-probs (temperature 1). fp32 agrees to ~1e-5 (tolerance
    1e-4); bf16 kernels differ by up to ~0.1-0.3 on single tokens (tolerance 0.5), which hides a small update or a skipped
    sync: sync_generator's checksums catch those; this catches a generator that computes wrong."""
    with torch.no_grad():
        policy_logps = forward(policy, [sample], temperature=1.0)[0]
        if backend == "vllm":
            generator_logps = torch.tensor(sample["generator_logps"], device=device)
        else:  # (n, V): the positions that predict the n response tokens
            logits = generator(input_ids=torch.tensor([sample["input_ids"]], device=device)).logits[0, -len(sample["response"]) - 1 : -1]
            generator_logps = logits.float().log_softmax(-1).gather(-1, torch.tensor(sample["response"], device=device)[:, None])[:, 0]
    difference = (policy_logps - generator_logps.to(policy_logps)).abs().max()
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    if difference.item() > tolerance:
        raise RuntimeError(f"generator self-check failed: its log-probs differ from the policy's by up to {difference.item():.3g} "
                           f"(tolerance {tolerance:g}): the weight sync is broken or stale ({backend} backend)")
    return difference.item()


def group_share(indices):
    """Which of `indices` this rank generates: its own (index % world_size == rank) and, under vLLM tensor parallelism,
    those of the other ranks of its engine group, since all ranks of one engine must send it the same requests."""
    return [i for i in indices if (i % world_size) // gen_tp == rank // gen_tp]


def gather(items):
    """Every rank's list -> one list on every rank, rank 0's items first (all_gather_object pickles them)."""
    lists = [None] * world_size
    dist.all_gather_object(lists, items)
    return sum(lists, [])


def evaluate():
    """Greedy (temperature 0) verifier reward on the held-out prompts, each rank a strided share, gathered."""
    indices = group_share(range(len(eval_prompts)))
    responses = generate([eval_prompts[i]["prompt_ids"] for i in indices])
    mine = []  # (dataset, score, response tokens) of this rank's prompts
    for p, (response, finished, _) in [(eval_prompts[i], out) for i, out in zip(indices, responses) if i % world_size == rank]:
        # the verifier reads the text without its stop token, special or not (as vLLM's text is), and the prompt
        text = tokenizer.decode(response[:-1] if finished else response, skip_special_tokens=True)
        mine.append((p["dataset"], common.verify(p["dataset"], text, p["ground_truth"], p["question"]), len(response)))
    results = gather(mine)  # (dataset, score, response tokens) of every prompt
    mean = lambda values: sum(values) / len(values)
    metrics = {"eval/reward": args.verification_reward * mean([score for _, score, _ in results]),
               "eval/accuracy": mean([score == 1 for _, score, _ in results]),
               "eval/response_length": mean([n for _, _, n in results])}  # a reward gained by shrinking shows here
    for name in sorted({d for d, _, _ in results}):
        metrics[f"eval/reward/{name}"] = args.verification_reward * mean([score for d, score, _ in results if d == name])
    return metrics


# ----------------------------------------------------------------------------- Checkpoints

os.makedirs(args.output_dir, exist_ok=True)
metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
rollouts_path = os.path.join(args.output_dir, "rollouts.jsonl")
models = {"policy": (policy, optimizer)} | ({"value": (value_model, value_optimizer)} if value_model else {})


def training_state():
    """{policy_model, policy_optimizer[, value_model, value_optimizer]}: sharded state dicts for DCP."""
    return {f"{name}_{part}": state for name, (model, opt) in models.items()
            for part, state in zip(("model", "optimizer"), get_state_dict(model, opt))}


def save_checkpoint(step):
    """Policy (and value model) + optimizer shards via DCP; the step and every rank's RNG state beside them."""
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    dcp.save(training_state(), checkpoint_id=path)
    common.finish_checkpoint(path, {"step": step, "run": vars(args), "reference": weights_key}, args.keep_last_n_checkpoints)


start_step = 0
if resume_from:
    common.check_resumed_reference(resume_from, weights_key, device)
    state = training_state()
    dcp.load(state, checkpoint_id=resume_from)
    for name, (model, opt) in models.items():
        set_state_dict(model, opt, model_state_dict=state[f"{name}_model"], optim_state_dict=state[f"{name}_optimizer"])
    start_step = common.load_trainer_state(resume_from)["step"]  # (and this rank's RNG state restored)
    print0(f"resumed from {resume_from} at step {start_step}")
# New logs, or on --resume their lines up to the checkpoint's step, so they read like one uninterrupted run.
for log_path in [metrics_path] + ([rollouts_path] if args.save_rollouts else []):  # (rank 0's)
    common.start_log(log_path, start_step if resume_from else None)


track = common.start_tracking(args.report_to, args.output_dir, "rlvr", vars(args), start_step) if args.with_tracking else None


# ----------------------------------------------------------------------------- Training loop

sync_generator()  # the generator starts from the same checkpoint; syncing anyway covers --resume
if args.eval_every > 0 and start_step == 0:
    common.append_log(metrics_path, [{"step": 0, **evaluate()}], track)
progress = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, disable=rank != 0, desc=f"rlvr {args.algo}")
for step in progress:
    metrics, step_start = {"step": step + 1}, time.time()

    # --- rollout: generate, then score with the verifiers -------------------------------------------------------------
    batch = rollout_prompts(step)  # P global prompt indices; prompt j of the batch belongs to rank j % world_size
    positions = group_share(range(P))
    # a seed per prompt, not per rank; G apart: vLLM seeds sample k of a request with seed + k (vllm/v1/engine/
    # parallel_sampling.py:81), so consecutive seeds gave two prompts' samples the same noise
    seeds = [((args.seed * 1_000_003 + step) * 1_000_003 + batch[j]) % (2**31 // G) * G for j in positions]
    prompts = dict(zip(positions, read_train_prompts([batch[j] for j in positions])))  # from the memory-mapped file
    generated = generate([prompts[j]["prompt_ids"] for j in positions], G, seeds)
    if backend == "vllm":
        llm.sleep(level=1)  # free the KV cache and move weights to the CPU: the GPU now belongs to training
    metrics["time/generate"] = time.time() - step_start
    samples = []  # this rank's samples, prompt-major: samples[k * G : (k + 1) * G] share a prompt
    for k, j in enumerate(positions):
        if j % world_size != rank:
            continue
        prompt = prompts[j]
        for response, finished, generator_logps in generated[k * G : (k + 1) * G]:
            text = tokenizer.decode(response[:-1] if finished else response, skip_special_tokens=True)  # as in evaluate()
            score = common.verify(prompt["dataset"], text, prompt["ground_truth"], prompt["question"])  # (and the question)
            penalized = args.non_stop_penalty and not finished  # Tulu: the penalty replaces the reward
            samples.append(dict(position=j, prompt_index=batch[j], dataset=prompt["dataset"], ground_truth=prompt["ground_truth"],
                                response=response, finished=finished, generator_logps=generator_logps, score=score,
                                reward=args.penalty_reward_value if penalized else args.verification_reward * score,
                                input_ids=prompt["prompt_ids"] + response, labels=[-100] * len(prompt["prompt_ids"]) + response))

    # --- old log-probs, reference log-probs, old values: one no-grad pass before any update ---------------------------
    # old_logps come from the TRAINING model, not the generator: vLLM's bf16 kernels, batching and sampler differ
    # numerically from the FSDP forward, so generator log-probs in the ratio would make it != 1 before any update and
    # the clip would act on numerical noise (a bias, not a trust region). The PPO ratio compares two parameter versions
    # of ONE implementation. (The generator's numbers are only used by the self-check.)
    micro = args.per_device_train_batch_size
    with torch.no_grad():  # without a reference (beta 0), ref_logps = old_logps: a KL of 0
        for chunk in (samples[b : b + micro] for b in range(0, len(samples), micro)):
            for key, model in (("old_logps", policy), ("ref_logps", policy if reference is None else reference), ("old_values", value_model)):
                outs = forward(model, chunk)[0].split([len(s["response"]) for s in chunk]) if model else [None] * len(chunk)
                for s, out in zip(chunk, outs):
                    s[key] = out
    metrics["self_check_max_diff"] = self_check(samples[0])
    for model in filter(None, (policy, reference, value_model)):  # FSDP2 reshards the root only in backward: after a
        model.reshard()  # no-grad forward, do it

    # --- advantages -----------------------------------------------------------------------------------------------------
    if args.algo == "grpo":
        # GRPO (Shao et al. 2024, eq. 3 outcome supervision): A = (r - mean(group)) / (std(group) + 1e-8) for every token
        # of a response; the sample std (ddof 1) as Tulu 3.1 took it (open-instruct grpo_vllm_thread_ray_gtrl.py:1166-1169@6d97283db)
        for k in range(0, len(samples), G):
            rewards = torch.tensor([s["reward"] for s in samples[k : k + G]], dtype=torch.float64)
            advantages = (rewards - rewards.mean()) / (rewards.std(correction=1) + 1e-8)
            for s, a in zip(samples[k : k + G], advantages.tolist()):
                s["advantages"] = torch.full((len(s["response"]),), a, device=device)
    else:
        # PPO (Tulu 3): per-token reward = -beta * (log pi_old - log ref) (the KL penalty, k1 estimator) plus the verifier
        # reward on the last token; GAE (Schulman et al. 2016, eq. 16): delta_t = r_t + gamma V_{t+1} - V_t,
        # A_t = delta_t + gamma lambda A_{t+1}, V after the last token = 0; returns = A + V are the value targets.
        for s in samples:
            rewards = -args.beta * (s["old_logps"] - s["ref_logps"])
            rewards[-1] += s["reward"]
            r, v, n = rewards.tolist(), s["old_values"].tolist(), len(rewards)  # a python loop: no kernel per token
            gae, running = [0.0] * n, 0.0
            for t in reversed(range(n)):
                running = r[t] + args.gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] + args.gamma * args.lam * running
                gae[t] = running
            s["token_rewards"], s["gae"] = rewards, torch.tensor(gae, device=device)
            s["returns"] = s["gae"] + s["old_values"]
        # whiten over every response token of the rollout batch, all ranks together, so the split does not matter; as Tulu 3's
        # masked_whiten (ppo_vllm_thread_ray_gtrl.py:460-485@9c2d44bec): unbiased variance, the 1e-8 inside the sqrt
        gae = torch.cat([s["gae"] for s in samples]).double()
        moments = torch.tensor([gae.sum(), (gae ** 2).sum(), gae.numel()], dtype=torch.float64, device=device)
        dist.all_reduce(moments)
        mean, var = moments[0] / moments[2], (moments[1] - moments[0] ** 2 / moments[2]).clamp(min=0) / (moments[2] - 1).clamp(min=1)
        for s in samples:  # scaled by 1e4 at most: a spread of <= 1e-4 (noise, e.g. every reward equal) is not blown up
            s["advantages"] = ((s["gae"] - mean) * (var + 1e-8).rsqrt()).float()

    # --- policy (and value) updates: num_epochs x num_mini_batches optimizer steps ---------------------------------------
    per_mini = P // args.num_mini_batches  # prompts per mini-batch; mini-batch m = batch positions [m * per_mini, ...)
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in ("pg_loss", "vf_loss", "clip_frac", "entropy", "tokens")}
    first_ratio, grad_norms, value_grad_norms = None, [], []
    for epoch in range(args.num_epochs):
        for m in range(args.num_mini_batches):
            # "linear" decays at every optimizer step, to 0 after the last, as open-instruct's (grpo_fast.py:376-382@e6c3044aa)
            done = ((step * args.num_epochs + epoch) * args.num_mini_batches + m) / (args.max_steps * args.num_epochs * args.num_mini_batches)
            lr = args.learning_rate * (1 - done if args.lr_scheduler_type == "linear" else 1.0)
            for group in optimizer.param_groups + (value_optimizer.param_groups if value_optimizer else []):
                group["lr"] = lr
            mini = [s for s in samples if s["position"] // per_mini == m]
            tokens = torch.tensor(float(sum(len(s["response"]) for s in mini)), dtype=torch.float64, device=device)
            dist.all_reduce(tokens)  # token-level normalization over the whole mini-batch, all ranks
            loss_scale = world_size / tokens.item()  # FSDP averages gradients over ranks: undo it (as in sft.py)
            chunks = [mini[b : b + micro] for b in range(0, len(mini), micro)]
            ratio_sum = torch.zeros((), dtype=torch.float64, device=device)
            for c, chunk in enumerate(chunks):
                policy.set_requires_gradient_sync(last := c == len(chunks) - 1)  # reduce-scatter after the last micro-batch
                logps, entropy = forward(policy, chunk)  # (N,)
                old = torch.cat([s["old_logps"] for s in chunk])
                advantages = torch.cat([s["advantages"] for s in chunk])
                ratio = torch.exp(logps - old)  # pi_theta / pi_old per token
                # clipped surrogate (PPO, Schulman et al. 2017, eq. 7), as a loss to minimize
                unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - args.cliprange, 1 + args.cliprange)
                loss = pg_losses = torch.max(unclipped, clipped)
                if args.algo == "grpo" and reference is not None:
                    log_ref_ratio = torch.cat([s["ref_logps"] for s in chunk]) - logps
                    kl = log_ref_ratio.exp() - log_ref_ratio - 1  # k3 estimator of KL(pi_theta || ref), GRPO eq. 4
                    loss = loss + args.beta * kl
                (loss.sum() * loss_scale).backward()
                if value_model is not None:
                    value_model.set_requires_gradient_sync(last)
                    values = forward(value_model, chunk)[0]
                    old_values, returns = torch.cat([s["old_values"] for s in chunk]), torch.cat([s["returns"] for s in chunk])
                    clipped_values = old_values + (values - old_values).clamp(-args.cliprange_value, args.cliprange_value)
                    vf_losses = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
                    (args.vf_coef * vf_losses.sum() * loss_scale).backward()
                    sums["vf_loss"] += vf_losses.sum().detach()
                sums["pg_loss"] += pg_losses.sum().detach()
                sums["clip_frac"] += (clipped > unclipped).sum()  # tokens whose gradient the clip stops (as open-instruct, TRL)
                sums["entropy"] += entropy.sum()
                sums["tokens"] += len(logps)  # the step's policy-forward tokens (all epochs, mini-batches, ranks): per-token means
                ratio_sum += ratio.sum().detach()
            if first_ratio is None:  # before any update of this rollout: exactly 1 when old_logps are recomputed
                dist.all_reduce(ratio_sum)
                first_ratio = ratio_sum.item() / tokens.item()
            for model, opt, norms in ((policy, optimizer, grad_norms), (value_model, value_optimizer, value_grad_norms))[: 1 + bool(value_model)]:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
                norms.append(norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item())
                opt.step()
                opt.zero_grad(set_to_none=True)

    # KL of the policy that sampled to the reference, k3, mean per response token of the whole rollout batch
    d = torch.cat([s["ref_logps"] - s["old_logps"] for s in samples])
    sums |= {"kl": (d.exp() - d - 1).sum(), "response_tokens": sum(len(s["response"]) for s in samples),
             "finished": sum(s["finished"] for s in samples)}
    totals = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device) for value in sums.values()])
    dist.all_reduce(totals)
    sums = dict(zip(sums, totals.tolist()))
    sync_generator()  # after the last optimizer step: the next rollout samples from the new policy

    # --- metrics ---------------------------------------------------------------------------------------------------------
    everything = gather([(s["dataset"], s["score"], s["reward"]) for s in samples])
    rewards = torch.tensor([r for _, _, r in everything], dtype=torch.float64)
    metrics |= {"reward": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
                "score": sum(sc for _, sc, _ in everything) / len(everything)}
    metrics |= {f"accuracy/{name}": sum(sc == 1 for d, sc, _ in everything if d == name) / sum(d == name for d, _, _ in everything)
                for name in sorted({d for d, _, _ in everything})}
    metrics |= {"response_length": sums["response_tokens"] / len(everything), "finished": sums["finished"] / len(everything),
                "kl": sums["kl"] / sums["response_tokens"], "ratio_mean": first_ratio, "lr": lr, "grad_norm": sum(grad_norms) / len(grad_norms),
                "tokens_per_sec": sums["response_tokens"] / (time.time() - step_start)}
    metrics |= {name: sums[name] / sums["tokens"] for name in ("clip_frac", "entropy", "pg_loss") + ("vf_loss",) * bool(value_model)}
    metrics |= {"value_grad_norm": sum(value_grad_norms) / len(value_grad_norms)} if value_model else {}
    if args.save_rollouts:
        rows = gather([{"step": step + 1, "rank": rank, **{k: v.tolist() if torch.is_tensor(v) else v for k, v in s.items()
                                                           if k not in ("input_ids", "labels")}} for s in samples])
        common.append_log(rollouts_path, rows)
    if args.eval_every > 0 and ((step + 1) % args.eval_every == 0 or step + 1 == args.max_steps):
        metrics |= evaluate()
    common.append_log(metrics_path, [metrics], track)  # (rank 0's, to its tracker too)
    progress.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{metrics['kl']:.4f}")
    if args.checkpointing_steps and (step + 1) % args.checkpointing_steps == 0 and step + 1 < args.max_steps:
        save_checkpoint(step + 1)

# ----------------------------------------------------------------------------- Save

# The policy as an ordinary HF directory with the tokenizer, gathered on rank 0, as sft.py saves.
common.save_model(policy, tokenizer, args.output_dir, torch.bfloat16 if bf16 else torch.float32)
if backend == "vllm":  # the engine's shutdown destroys its groups, then torch's default one (vllm/v1/engine/core.py:824-839)
    llm.llm_engine.engine_core.shutdown()
else:
    dist.destroy_process_group()
