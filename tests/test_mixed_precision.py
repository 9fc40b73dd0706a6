"""--mixed_precision bf16 on CPU: the GPU path's precision (bf16 compute on fp32 master weights, FSDP2's
MixedPrecisionPolicy), run where CI can run it. Each stage is checked against its own fp32 run and against the
numbers that hold exactly whatever the precision."""
import math
import os

import pytest
from safetensors import safe_open

from conftest import read_metrics, run_script, write_jsonl
from test_dpo import preference_rows
from test_rlvr import FAST as RLVR_FAST, rlvr_rows
from test_sft import FAST


def safetensors_dtypes(model_dir):
    """{dtype names} of the tensors in a saved model's model.safetensors."""
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def test_sft_bf16_tracks_fp32_and_saves_bf16(tiny_model_dir, sft_data, tmp_path):
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "1.0", "--reduce_loss", "mean",
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--max_steps", 4, *FAST]
    run_script("sft.py", *args, "--output_dir", tmp_path / "fp32")
    run_script("sft.py", *args, "--mixed_precision", "bf16", "--output_dir", tmp_path / "bf16")
    fp32, bf16 = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "bf16")
    # the same trajectory within bf16's rounding (8 bits of mantissa: ~0.4% per operation), but computed in bf16
    assert [m["loss"] for m in bf16] == pytest.approx([m["loss"] for m in fp32], rel=2e-2)
    assert [m["grad_norm"] for m in bf16] == pytest.approx([m["grad_norm"] for m in fp32], rel=5e-2)
    assert bf16[0]["loss"] != fp32[0]["loss"]
    assert safetensors_dtypes(tmp_path / "fp32") == {"F32"} and safetensors_dtypes(tmp_path / "bf16") == {"BF16"}


def test_dpo_bf16_starts_at_ln2_with_its_own_reference_cache(tiny_model_dir, tmp_path):
    """Policy == reference at step 1 in any precision: the margin is exactly 0 and the loss ln 2. The reference
    log-probs are cached per compute dtype: a bf16 run never reuses an fp32 run's."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(8))
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", pairs, "1.0", "--max_seq_length", 256,
            "--max_steps", 2, "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 4,
            "--ref_cache_dir", tmp_path / "cache", *FAST]
    fp32 = run_script("dpo.py", *args, "--output_dir", tmp_path / "fp32").stdout
    bf16 = run_script("dpo.py", *args, "--mixed_precision", "bf16", "--output_dir", tmp_path / "bf16").stdout
    assert "reference log-probs: computed for 8 pairs" in fp32 and "reference log-probs: computed for 8 pairs" in bf16
    assert len(os.listdir(tmp_path / "cache")) == 2
    first = read_metrics(tmp_path / "bf16")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert read_metrics(tmp_path / "bf16")[1]["loss"] == pytest.approx(read_metrics(tmp_path / "fp32")[1]["loss"], rel=5e-2)
    assert safetensors_dtypes(tmp_path / "bf16") == {"BF16"}


def test_rlvr_bf16_policy_and_generator_pass_the_self_check(tiny_model_dir, tmp_path):
    """bf16 policy, bf16 HF generator (its default under --mixed_precision bf16): every sync's checksums match, the
    log-prob self-check passes at the bf16 tolerance, and the first PPO ratio is exactly 1 (old log-probs come from
    the training model itself)."""
    data = write_jsonl(tmp_path / "rlvr.jsonl", rlvr_rows())
    result = run_script("rlvr.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0",
                        "--eval_every", 0, "--max_steps", 2, "--mixed_precision", "bf16", "--output_dir", tmp_path / "out",
                        *RLVR_FAST)
    metrics = read_metrics(tmp_path / "out")
    assert len(metrics) == 2, result.stdout
    for m in metrics:
        assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert 0 < m["self_check_max_diff"] < 0.5  # bf16 kernels differ a little from the FSDP forward, never by 0.5
    assert safetensors_dtypes(tmp_path / "out") == {"BF16"}
