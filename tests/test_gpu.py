"""The GPU path, in one command: `python -m pytest tests/test_gpu.py` (skipped without CUDA, so CI collects and skips it).

- packed varlen flash attention == per-document SDPA in bf16, grouped-query attention included;
- a tiny Llama's packed forward == its per-document forward on CUDA in bf16;
- sft.py, dpo.py and rlvr.py (HF generator) for a few steps under torchrun on one GPU (nccl, bf16 compute): losses
  finite and falling, DPO's first loss ln 2, the RLVR self-check passing; save -> reload -> the trainer's next loss;
- when vLLM imports: rlvr.py with vLLM generating (torchrun and plain python); eval.py with vLLM == with HF
  (greedy, first tokens), two vLLM engines in a row."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import ROOT, SCRIPT_ENV, read_metrics, write_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def torchrun(script, *args):
    """One GPU under torchrun: nccl, bf16 compute with fp32 master weights (the stages' CUDA setup)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone",
               os.path.join(ROOT, script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=SCRIPT_ENV, cwd=ROOT)
    if result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def per_document_sdpa(query, key, value, cu_seqlens, scaling):
    """(1, H, T, D) -> (1, T, H, D): each document alone through causal SDPA."""
    bounds = list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                           scale=scaling, enable_gqa=True) for s, e in bounds]
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 64), (9, 3, 64), (16, 16, 128)])
def test_varlen_attention_matches_per_document_sdpa_in_bf16(heads, kv_heads, head_dim):
    torch.manual_seed(0)
    lengths = [1, 300, 17, 1000, 4096 - 1318]
    cu_seqlens = torch.tensor([0] + lengths, device=CUDA).cumsum(0).to(torch.int32)
    T, scaling = sum(lengths), head_dim ** -0.5
    query = torch.randn(1, heads, T, head_dim, device=CUDA)
    key, value = torch.randn(2, 1, kv_heads, T, head_dim, device=CUDA)
    exact = per_document_sdpa(query.double(), key.double(), value.double(), cu_seqlens, scaling).float()
    bf16 = [x.bfloat16() for x in (query, key, value)]
    packed, _ = common.packed_attention(None, *bf16, None, scaling=scaling, cu_seq_lens_q=cu_seqlens,
                                        max_length_q=max(lengths))
    sdpa = per_document_sdpa(*bf16, cu_seqlens, scaling)
    assert packed.shape == sdpa.shape == (1, T, heads, head_dim) and packed.dtype == torch.bfloat16
    packed_error, sdpa_error = ((x.float() - exact).abs().max().item() for x in (packed, sdpa))
    assert packed_error <= 2 * sdpa_error + 1e-3, (packed_error, sdpa_error)  # as close to exact as bf16 SDPA is
    # a wrong document boundary would be far off: the last document attending to the others
    leaked = per_document_sdpa(*bf16, torch.tensor([0, T], device=CUDA, dtype=torch.int32), scaling)
    assert (leaked.float() - exact).abs().max() > 100 * max(packed_error, 1e-3)


def test_packed_model_forward_matches_per_document_forward_in_bf16(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    common.register_packed_attention()
    packed_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="packed").to(CUDA)
    plain_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(CUDA)
    documents = [tokenizer(text)["input_ids"] for text in ["Hello there, how are you?", "One", "A much longer document " * 40]]
    examples = [(ids, ids) for ids in documents]
    inputs, _ = common.collate(examples, True, tokenizer.pad_token_id, CUDA)
    with torch.no_grad():
        packed = packed_model(**inputs).logits[0].float()  # (T, V)
        alone = torch.cat([plain_model(input_ids=torch.tensor([ids], device=CUDA)).logits[0].float() for ids in documents])
    assert (packed - alone).abs().max().item() < 0.05 * alone.abs().max().item()
    assert packed.argmax(-1).eq(alone.argmax(-1)).float().mean().item() > 0.98


def test_sft_on_one_gpu_trains_and_saves_what_it_trained(tiny_model_dir, sft_data, tokenizer, tmp_path):
    """As tests/test_sft.py's CPU check: the model saved after 2 steps, reloaded, has the loss that a 3-step run logs
    for step 3 (global batch = the whole data set), here within bf16 tolerance."""
    from transformers import AutoModelForCausalLM

    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "8", "--reduce_loss", "mean",
            "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--preprocessing_num_workers", 1,
            "--lr_scheduler_type", "constant", "--warmup_ratio", 0, "--learning_rate", 1e-2]
    torchrun("sft.py", *args, "--max_steps", 2, "--output_dir", tmp_path / "two")
    torchrun("sft.py", *args, "--max_steps", 3, "--output_dir", tmp_path / "three")
    losses = [m["loss"] for m in read_metrics(tmp_path / "three")]
    assert all(math.isfinite(loss) for loss in losses) and losses[2] < losses[0]
    from safetensors import safe_open

    with safe_open(tmp_path / "two" / "model.safetensors", framework="pt") as saved:  # the file's dtype, not a load's
        assert {saved.get_slice(k).get_dtype() for k in saved.keys()} == {"BF16"}  # saved in the dtype it was computed in
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two", dtype=torch.bfloat16).to(CUDA)
    examples = [common.tokenize_conversation(tokenizer, json.loads(line)["messages"]) for line in open(sft_data).readlines()[:8]]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids], device=CUDA)).logits[0, :-1].float()
            total += F.cross_entropy(logits, torch.tensor(labels[1:], device=CUDA), ignore_index=-100, reduction="sum").item()
            count += sum(label != -100 for label in labels[1:])
    assert total / count == pytest.approx(losses[2], rel=2e-2)


def test_dpo_on_one_gpu_starts_at_ln2_and_learns(tiny_model_dir, tmp_path):
    from test_dpo import preference_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))
    torchrun("dpo.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", pairs, "16",
             "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--max_steps", 4,
             "--preprocessing_num_workers", 1, "--lr_scheduler_type", "constant", "--warmup_ratio", 0,
             "--learning_rate", 1e-2, "--ref_cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "dpo")
    metrics = read_metrics(tmp_path / "dpo")
    # policy == reference at step 1: the margin is 0 up to bf16 rounding of the two forwards
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=5e-3)
    assert metrics[-1]["loss"] < metrics[0]["loss"] and metrics[-1]["rewards/accuracy"] > 0.5
    assert os.path.exists(tmp_path / "dpo" / "model.safetensors")


def rlvr_args(tiny_model_dir, tmp_path, generator):
    from test_rlvr import rlvr_rows

    data = write_jsonl(tmp_path / "rlvr.jsonl", rlvr_rows())
    return ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--eval_dataset", data,
            "--num_unique_prompts_rollout", 4, "--num_samples_per_prompt", 4, "--response_length", 16,
            "--per_device_train_batch_size", 4, "--learning_rate", 1e-3, "--max_steps", 3, "--eval_every", 3,
            "--generator", generator, "--output_dir", tmp_path / generator]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rlvr_hf_generator_on_one_gpu(tiny_model_dir, tmp_path, algo):
    torchrun("rlvr.py", *rlvr_args(tiny_model_dir, tmp_path, "hf"), "--algo", algo)
    metrics = [m for m in read_metrics(tmp_path / "hf") if m["step"] > 0]
    assert len(metrics) == 3 and all(math.isfinite(m["reward"]) and math.isfinite(m["kl"]) for m in metrics)
    # the generator was synced after every step: its log-probs match the policy's (bf16 tolerance, the run stops if not)
    assert all(m["self_check_max_diff"] < 0.5 for m in metrics)
    assert metrics[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-2)  # before any update, new policy == old policy


@pytest.mark.parametrize("launcher", ["torchrun", "python"])
def test_vllm_generator_on_one_gpu(tiny_model_dir, tmp_path, launcher):
    """Real vLLM (never run so far; tests/test_vllm.py runs the same branch against a CPU stand-in): under torchrun and
    from a plain `python rlvr.py` (external_launcher reads RANK etc., which rlvr.py then sets); the checksum half of the
    self-check passes or the run stops; bf16 tensors go in, so vLLM's loader logs no dtype mismatch."""
    pytest.importorskip("vllm")
    if launcher == "torchrun":
        result = torchrun("rlvr.py", *rlvr_args(tiny_model_dir, tmp_path, "vllm"))
    else:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "rlvr.py"), *map(str, rlvr_args(tiny_model_dir, tmp_path, "vllm"))],
                                capture_output=True, text=True, env=SCRIPT_ENV, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-6000:]
    metrics = [m for m in read_metrics(tmp_path / "vllm") if m["step"] > 0]
    assert len(metrics) == 3 and all(math.isfinite(m["reward"]) and m["self_check_max_diff"] < 0.5 for m in metrics)
    assert "Attempted to load weight" not in result.stdout + result.stderr


def test_eval_vllm_matches_hf_greedy_with_two_engines_in_a_row(tiny_model_dir, tokenizer, tmp_path):
    """eval.py's vLLM path against its HF path, greedy, both in bf16 (vLLM downcasts an fp32 checkpoint:
    vllm/config/model.py:2422-2424; eval.py's HF path computes in bf16 on CUDA): the same prompts must give the same
    first tokens (a wrong template or few-shot prompt would differ from the first token on; bf16 kernels may part
    later). The model twice in one vLLM call: the first engine must be shut down for the second to start."""
    pytest.importorskip("vllm")

    def responses(generator, *models):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model_name_or_path", *models,
                                 "--task", "gsm8k", "--task", "ifeval", "--limit", "8", "--max_new_tokens", "16",
                                 "--generator", generator, "--output_dir", str(tmp_path / generator)],
                                capture_output=True, text=True, env=SCRIPT_ENV, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-6000:]
        run_dirs = [tmp_path / generator] if len(models) == 1 else [tmp_path / generator / f"{k}_{os.path.basename(m)}"
                                                                     for k, m in enumerate(models)]
        return [[json.loads(line)["response"] for task in ("gsm8k", "ifeval") for line in open(d / f"{task}_records.jsonl")]
                for d in run_dirs]

    first_engine, second_engine = responses("vllm", tiny_model_dir, tiny_model_dir)
    (hf,) = responses("hf", tiny_model_dir)
    assert len(hf) == len(first_engine) == 16 and first_engine == second_engine  # greedy: the same engine twice
    head = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"][:3]
    agree = sum(head(v) == head(h) for v, h in zip(first_engine, hf))
    assert agree >= 12, list(zip(first_engine, hf))
