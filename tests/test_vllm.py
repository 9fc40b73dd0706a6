"""The vLLM branches of rlvr.py and eval.py, on CPU, against tests/fake_vllm: a stand-in of vLLM 0.32.0's offline API
written from its source (real vLLM has never run in these tests; `pytest -k vllm` selects them).

First the stand-in itself against what it models; then rlvr.py (plain python and torchrun, GRPO and PPO, the
self-check passing after real syncs and stopping a run whose sync was skipped) and eval.py (several models in one call)."""
import json
import logging
import os
import socket
import sys

import pytest
import torch

from conftest import FAKE_VLLM, VLLM_ENV, read_metrics, run_script, write_jsonl
from test_rlvr import FAST, rlvr_rows


@pytest.fixture(scope="module")
def rlvr_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rlvr") / "rlvr.jsonl", rlvr_rows())


@pytest.fixture()
def fake_vllm(monkeypatch):
    monkeypatch.syspath_prepend(FAKE_VLLM)
    sys.modules.pop("vllm", None)
    import vllm

    assert vllm.__file__.startswith(FAKE_VLLM)
    yield vllm
    sys.modules.pop("vllm", None)


def test_vllm_stand_in_keeps_the_contracts_it_models(fake_vllm, tiny_model_dir, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(KeyError, match="RANK"):  # external_launcher outside torchrun, without the variables
        fake_vllm.LLM(model=tiny_model_dir, distributed_executor_backend="external_launcher")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(key, str(value))
    llm = fake_vllm.LLM(model=tiny_model_dir, distributed_executor_backend="external_launcher", dtype="float32",
                        enable_sleep_mode=True, gpu_memory_utilization=0.6)
    assert torch.distributed.is_initialized()  # made from env:// as vLLM does when there is no group
    engine = llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    params, hf_params = dict(engine.named_parameters()), dict(hf.named_parameters())
    layer = "model.layers.1."
    qkv = torch.cat([hf_params[layer + f"self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(params[layer + "self_attn.qkv_proj.weight"], qkv)  # stacked q, k, v rows in that order
    assert torch.equal(params[layer + "mlp.gate_up_proj.weight"],
                       torch.cat([hf_params[layer + "mlp.gate_proj.weight"], hf_params[layer + "mlp.up_proj.weight"]]))
    assert "lm_head.weight" not in params  # tied: the embedding's own parameter

    # sampled at temperature 0.5, the log-probs returned are raw (temperature 1): the HF forward's log_softmax
    prompt = [1, 20, 30, 40]
    params_ = fake_vllm.SamplingParams(n=2, temperature=0.5, max_tokens=5, logprobs=0, seed=3, stop_token_ids=[])
    out = llm.generate([{"prompt_token_ids": prompt}], params_, use_tqdm=False)[0].outputs
    assert len(out) == 2 and all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in out)
    for c in out:
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([prompt + list(c.token_ids)])).logits[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert [position[t].logprob for position, t in zip(c.logprobs, c.token_ids)] == pytest.approx(expected.tolist(), abs=1e-4)
        assert all(len(position) == 1 for position in c.logprobs)  # logprobs=0: the sampled token only
    again = llm.generate([{"prompt_token_ids": prompt}], params_, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in again] == [c.token_ids for c in out]  # a seeded request repeats

    # a loaded tensor replaces its rows of the stack; a dtype mismatch warns (utils.py:324-339), widening does not
    new_k = torch.randn_like(hf_params[layer + "self_attn.k_proj.weight"])
    with caplog.at_level(logging.DEBUG, logger="vllm.model_executor.models.utils"):
        engine.load_weights([(layer + "self_attn.k_proj.weight", new_k.double())])
    assert "Attempted to load weight" in caplog.text and any(r.levelno == logging.WARNING for r in caplog.records)
    q_rows = hf_params[layer + "self_attn.q_proj.weight"].shape[0]
    assert torch.equal(params[layer + "self_attn.qkv_proj.weight"][q_rows : q_rows + new_k.shape[0]], new_k.float())
    assert torch.equal(params[layer + "self_attn.qkv_proj.weight"][:q_rows], hf_params[layer + "self_attn.q_proj.weight"])

    llm.sleep(level=1)
    with pytest.raises(RuntimeError, match="sleeps"):
        llm.generate([{"prompt_token_ids": prompt}], params_, use_tqdm=False)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.load_weights([(layer + "self_attn.k_proj.weight", new_k)])
    assert llm.wake_up(tags=["weights"]) is False  # the KV cache still sleeps
    engine.load_weights([(layer + "self_attn.k_proj.weight", new_k)])
    assert llm.wake_up(tags=["kv_cache"]) is True
    llm.generate([{"prompt_token_ids": prompt}], params_, use_tqdm=False)

    with pytest.raises(ValueError, match="Free memory"):  # the first engine still holds its memory
        fake_vllm.LLM(model=tiny_model_dir, distributed_executor_backend="external_launcher", gpu_memory_utilization=0.6)
    llm.llm_engine.engine_core.shutdown()
    assert not torch.distributed.is_initialized()  # cleanup_dist_env_and_memory destroys torch's default group too


def rlvr_args(tiny_model_dir, rlvr_data, out, *extra):
    return ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0", "--eval_dataset", rlvr_data,
            "--max_steps", 2, "--generator", "vllm", "--output_dir", out, *FAST, *extra]


def test_rlvr_vllm_grpo_one_process_bf16(tiny_model_dir, rlvr_data, tmp_path):
    """Plain `python rlvr.py` (no torchrun variables): the engine starts, every sync passes both halves of the
    self-check, and the bf16 engine gets bf16 tensors (no dtype warning from its loader)."""
    result = run_script("rlvr.py", *rlvr_args(tiny_model_dir, rlvr_data, tmp_path, "--generator_dtype", "bfloat16",
                                              "--eval_every", 2), env=VLLM_ENV)
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [0, 1, 2] and "eval/reward" in metrics[2]
    assert all(m["self_check_max_diff"] < 0.5 for m in metrics[1:]) and metrics[2]["kl"] > 0
    assert "Attempted to load weight" not in result.stdout + result.stderr


def test_rlvr_vllm_ppo_two_processes_match_one(tiny_model_dir, rlvr_data, tmp_path):
    """Under torchrun every rank hosts its own engine; per-request seeds make the samples independent of the rank."""
    args = rlvr_args(tiny_model_dir, rlvr_data, tmp_path / "two", "--algo", "ppo", "--eval_every", 0)
    run_script("rlvr.py", *args, nproc=2, env=VLLM_ENV)
    run_script("rlvr.py", *args, "--output_dir", tmp_path / "one", env=VLLM_ENV)
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [m["step"] for m in two] == [1, 2]
    assert all(m["self_check_max_diff"] < 1e-4 for m in two) and two[1]["kl"] > 0  # fp32 on CPU
    for key in ["reward", "response_length", "kl", "pg_loss", "vf_loss", "grad_norm"]:
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-4, abs=1e-6), key


def test_rlvr_vllm_gives_every_prompt_samples_of_its_own(tiny_model_dir, tmp_path):
    """vLLM seeds sample k of a request with seed + k (vllm/v1/engine/parallel_sampling.py:76-81, as the stand-in does):
    prompts seeded with consecutive numbers (their dataset indices) shared samples, k + 1 of the one the k of the next.
    One prompt, 8 times in the data: no two of a step's 4 prompts may hold the same response."""
    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "Say anything."}],
                                                  "ground_truth": "7", "dataset": "gsm8k"}] * 8)
    run_script("rlvr.py", *rlvr_args(tiny_model_dir, data, tmp_path, "--eval_every", 0, "--save_rollouts"), env=VLLM_ENV)
    with open(tmp_path / "rollouts.jsonl") as f:
        samples = [json.loads(line) for line in f]
    for step in (1, 2):
        responses = {}
        for s in samples:
            if s["step"] == step:
                responses.setdefault(tuple(s["response"]), set()).add(s["prompt_index"])
        assert len(responses) == 16 and all(len(indices) == 1 for indices in responses.values()), step


@pytest.mark.parametrize("generator", ["vllm", "hf"])
def test_checksum_catches_a_sync_skipped_after_one_step_at_lr_5e7_in_bf16_vllm_and_hf(tiny_model_dir, rlvr_data, tmp_path, generator):
    """One optimizer step at Tulu's 5e-7 moves the fp32 master weights by ~5e-7, far below a bf16 ulp for most of them:
    log-probs barely move (see the README for the numbers), but the bf16 rounding of thousands of elements flips,
    and the checksum sees every one."""
    result = run_script("rlvr.py", *rlvr_args(tiny_model_dir, rlvr_data, tmp_path, "--generator", generator,
                                              "--generator_dtype", "bfloat16", "--learning_rate", 5e-7, "--eval_every", 0,
                                              "--debug_skip_weight_sync"), env=VLLM_ENV, check=False)
    assert result.returncode != 0
    assert "generator self-check failed: after the weight sync" in result.stderr and "checksums differ" in result.stderr
    assert read_metrics(tmp_path) == []  # stopped at the sync after step 1, the first that had anything to send


def test_eval_vllm_several_models_one_process_and_torchrun(tiny_model_dir, tmp_path):
    """Three engines one after the other in one call (the second would not start if the first were not shut down),
    the same greedy responses from one process and from two."""
    args = ["--model_name_or_path", tiny_model_dir, tiny_model_dir, tiny_model_dir, "--task", "gsm8k", "--task", "ifeval",
            "--limit", 3, "--max_new_tokens", 8, "--generator", "vllm"]
    run_script("eval.py", *args, "--output_dir", tmp_path / "one", env=VLLM_ENV)
    run_script("eval.py", *args, "--output_dir", tmp_path / "two", nproc=2, env=VLLM_ENV)
    for name in ("0_" + os.path.basename(tiny_model_dir), "2_" + os.path.basename(tiny_model_dir)):
        for task in ("gsm8k", "ifeval"):
            one, two = ([(r["response"], r["truncated"]) for r in map(json.loads, open(tmp_path / run / name / f"{task}_records.jsonl"))]
                        for run in ("one", "two"))
            assert len(one) == 3 and one == two  # responses, and whether each ran to the 8-token cap
    assert os.path.exists(tmp_path / "one" / "table.md") and os.path.exists(tmp_path / "two" / "table.md")
