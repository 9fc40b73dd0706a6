"""A CPU stand-in for the part of vLLM 0.32.0's offline API that rlvr.py and eval.py use. Test fixture only: the tests
put tests/fake_vllm on PYTHONPATH, so `import vllm` finds this. It runs an HF transformers model (slowly), but keeps the
real engine's contracts that our scripts depend on, each written from the vllm-0.32.0 wheel's source (`pip download
vllm==0.32.0 --no-deps`); file:line below refer to that wheel's vllm/ directory:

- LLM(...) takes the arguments the scripts pass; with distributed_executor_backend="external_launcher" it reads RANK
  and LOCAL_RANK from the environment (a KeyError without them) and joins torch's default process group, or makes one
  from env:// (MASTER_ADDR, MASTER_PORT) when there is none;
- generate() takes TokensPrompt dicts and SamplingParams, returns RequestOutputs whose CompletionOutputs hold token_ids
  (the stop token included), text (cut before a stop string), finish_reason "stop"/"length" and, with logprobs=k, per
  position {token id: Logprob} for the sampled token and the top k: raw log-probs, i.e. of the logits before
  temperature (logprobs_mode's default);
- sleep()/wake_up(tags): no generation and no weight loading while asleep;
- the model at llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model() has LlamaForCausalLM's
  vLLM parameter layout (q/k/v stacked in qkv_proj, gate/up in gate_up_proj, the vocabulary padded with zero rows), and
  its load_weights takes HF names, warning on a dtype mismatch as 0.32 does;
- a second engine cannot start while one that was not shut down holds the device memory, and the engine's shutdown
  destroys the parallel state and torch's default process group, as 0.32's does.
Not modelled: tensor parallelism, top_p < 1, top_k, text prompts, batching, speed."""
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

logger = logging.getLogger("vllm.model_executor.models.utils")
if not logger.handlers:  # vLLM logs to stdout by default (VLLM_LOGGING_STREAM, vllm/envs.py)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s [%(name)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@dataclass
class Logprob:  # vllm/logprobs.py:13-25
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm/outputs.py:51-87, the fields used here
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm/outputs.py:129-170
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: list | None
    outputs: list
    finished: bool


@dataclass
class SamplingParams:  # vllm/sampling_params.py:268-350: the fields our scripts set, with 0.32's defaults
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list | None = None
    stop: str | list | None = None  # strings that end the generation, cut from the text (sampling_params.py:324-326)
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None  # None: none; k: the sampled token's plus the k most likely; -1: the whole vocabulary

    def __post_init__(self):  # vllm/sampling_params.py:_verify_args (from line 631), the checks that matter here
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop  # :574-577
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.n < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ValueError("n and max_tokens must be at least 1")
        if self.top_p < 1.0 or self.top_k not in (0, -1):
            raise NotImplementedError("stand-in: top_p < 1 and top_k are not modelled")


# Device memory claimed by engines not shut down: vLLM checks at startup that the free memory covers
# gpu_memory_utilization (vllm/v1/worker/utils.py:761-770), and an engine that was only `del`eted still holds its own.
_claimed = []
_tensor_parallel_size = None  # vLLM's model-parallel groups (vllm/distributed/parallel_state.py, _TP and friends)


def _cleanup_dist_env_and_memory():
    """vllm/distributed/parallel_state.py:2516-2553: destroy_model_parallel(), then destroy_distributed_environment(),
    which also destroys torch's default process group if there is one (2506-2513), then gc and the device cache."""
    global _tensor_parallel_size
    _tensor_parallel_size = None
    if dist.is_initialized():
        dist.destroy_process_group()


class _EngineModel(torch.nn.Module):
    """The parameters of vLLM's LlamaForCausalLM (vllm/model_executor/models/llama.py), built from an HF Llama: the
    HF names, except q/k/v stacked row-wise into self_attn.qkv_proj and gate/up into mlp.gate_up_proj, and the embedding
    (and an untied lm_head) padded to a multiple of 64 rows (DEFAULT_VOCAB_PADDING_SIZE,
    vllm/model_executor/layers/vocab_parallel_embedding.py:36). A tied lm_head is the embedding's own parameter
    (llama.py:509-510), so named_parameters() lists it once."""

    def __init__(self, hf_model, dtype):
        super().__init__()
        config = hf_model.config
        self.tied = config.tie_word_embeddings
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        # row offsets of each shard in its stack: linear.py:1269-1276 (q, k, v), linear.py:823 (gate_up: output sizes)
        self.shards = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), 0: (0, config.intermediate_size),
                       1: (config.intermediate_size, config.intermediate_size)}
        self.vocab_size = config.vocab_size
        padded_vocab = -(-config.vocab_size // 64) * 64
        shapes = {"model.embed_tokens.weight": (padded_vocab, config.hidden_size), "model.norm.weight": (config.hidden_size,)}
        if not self.tied:
            shapes["lm_head.weight"] = (padded_vocab, config.hidden_size)
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes |= {p + "self_attn.qkv_proj.weight": (q + 2 * kv, config.hidden_size),
                       p + "self_attn.o_proj.weight": (config.hidden_size, q),
                       p + "mlp.gate_up_proj.weight": (2 * config.intermediate_size, config.hidden_size),
                       p + "mlp.down_proj.weight": (config.hidden_size, config.intermediate_size),
                       p + "input_layernorm.weight": (config.hidden_size,),
                       p + "post_attention_layernorm.weight": (config.hidden_size,)}
        self.params = {name: torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False) for name, shape in shapes.items()}
        for name, param in self.params.items():  # register under the dotted name, as the nested modules would
            module = self
            for part in name.split(".")[:-1]:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(name.split(".")[-1], param)
        self.asleep = False
        self.load_weights(hf_model.state_dict().items())  # the checkpoint goes through the same loader

    def load_weights(self, weights):
        """vllm/model_executor/models/utils.py AutoWeightsLoader.load_weights (451-478) with llama.py's mapper (348-357)."""
        if self.asleep:  # the weights were offloaded (level 1) or discarded (level 2): writing them is a bug
            raise RuntimeError("stand-in: load_weights while the engine's weights are asleep; call wake_up first")
        loaded = set()
        stacked = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
                   ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:  # dropped by REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER (utils.py:233-240)
                continue
            shard = None
            for part, (new, shard_id) in stacked.items():
                if part in name:
                    name, shard = name.replace(part, new, 1), shard_id
            if name == "lm_head.weight" and self.tied:  # an alias of the embedding: skipped (utils.py:291-292)
                continue
            if name not in self.params:
                raise ValueError(f"There is no module or parameter named {name!r} in LlamaForCausalLM")
            param = self.params[name]
            if param.dtype != tensor.dtype:  # utils.py:324-339: only an exact widening (into fp32/fp64) is quiet
                widening = tensor.dtype in (torch.float16, torch.bfloat16, torch.float32) and param.dtype in (torch.float32, torch.float64)
                (logger.debug if widening else logger.warning)(
                    "Attempted to load weight %s with dtype %s into parameter with dtype %s", name, tensor.dtype, param.dtype)
            if shard is not None:
                start, size = self.shards[shard]
                target = param.data[start : start + size]
            elif "embed_tokens" in name or "lm_head" in name:  # vocab_parallel_embedding.py:519-520: pad rows are 0
                param.data[tensor.shape[0] :].zero_()
                target = param.data[: tensor.shape[0]]
            else:
                target = param.data
            assert target.shape == tensor.shape, (name, target.shape, tensor.shape)  # linear.py:1323
            target.copy_(tensor)
            loaded.add(name)
        return loaded

    def to_hf(self, hf_model):
        """Write the engine's weights into the HF model that computes the logits: generation reads what the engine holds."""
        state = {}
        for name, param in self.params.items():
            if ".qkv_proj." in name or ".gate_up_proj." in name:
                parts = ("q", "k", "v") if ".qkv_proj." in name else (0, 1)
                hf = [name.replace(".qkv_proj.", f".{p}_proj.") for p in "qkv"] if ".qkv_proj." in name else \
                     [name.replace(".gate_up_proj.", f".{p}_proj.") for p in ("gate", "up")]
                for hf_name, part in zip(hf, parts):
                    start, size = self.shards[part]
                    state[hf_name] = param[start : start + size]
            else:
                state[name] = param[: self.vocab_size] if "embed_tokens" in name or "lm_head" in name else param
        if self.tied:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        hf_model.load_state_dict(state, strict=False)


class LLM:
    def __init__(self, model, *, tensor_parallel_size=1, dtype="auto", seed=0, gpu_memory_utilization=0.92,
                 enable_sleep_mode=False, max_model_len=None, distributed_executor_backend=None, **kwargs):
        # vllm/entrypoints/llm.py:178-224 takes many more keyword arguments; the stand-in refuses what it does not model
        if kwargs:
            raise TypeError(f"stand-in: LLM arguments not modelled: {sorted(kwargs)}")
        if distributed_executor_backend != "external_launcher":
            raise NotImplementedError("stand-in: only distributed_executor_backend='external_launcher' is modelled")
        if tensor_parallel_size != 1:
            raise NotImplementedError("stand-in: tensor parallelism is not modelled")
        # external_launcher: ParallelConfig turns off V1 multiprocessing, so the engine lives in this process
        # (vllm/config/parallel.py:1031-1033), and the executor reads the torchrun variables
        # (vllm/v1/executor/uniproc_executor.py:186-197): a KeyError when the script was not launched by torchrun
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        # vllm/distributed/parallel_state.py:1905-1955: join the existing default group, else make one from env://
        # (torch reads MASTER_ADDR and MASTER_PORT) of the engine's own size
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="env://", world_size=tensor_parallel_size, rank=rank)
        global _tensor_parallel_size
        if _tensor_parallel_size not in (None, tensor_parallel_size):  # parallel_state.py:2392-2396
            raise AssertionError("tensor parallel group already initialized, but of unexpected size")
        _tensor_parallel_size = tensor_parallel_size
        if sum(_claimed) + gpu_memory_utilization > 1.0:  # vllm/v1/worker/utils.py:761-770
            raise ValueError(f"Free memory on device ({1 - sum(_claimed):.2f}) on startup is less than desired GPU memory "
                             f"utilization ({gpu_memory_utilization}). Decrease GPU memory utilization or reduce GPU "
                             "memory used by other processes.")
        _claimed.append(gpu_memory_utilization)
        self._claim, self._alive = gpu_memory_utilization, True
        config = AutoConfig.from_pretrained(model)
        if dtype == "auto":  # vllm/config/model.py:2405-2427: the config's dtype, float32 downcast to bfloat16
            dtype = config.dtype if config.dtype not in (None, torch.float32) else torch.bfloat16
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        try:
            eos = GenerationConfig.from_pretrained(model).eos_token_id
        except OSError:
            eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.max_model_len = max_model_len or config.max_position_embeddings
        self.enable_sleep_mode, self.sleeping_tags = enable_sleep_mode, set()
        self.generator = torch.Generator().manual_seed(seed)  # requests without a seed draw from the engine's
        engine_model = _EngineModel(self.hf_model, self.dtype)
        # The chain rlvr.py reaches: LLMEngine.model_executor (vllm/v1/engine/llm_engine.py:136-138, in-process only)
        # -> UniProcExecutor.driver_worker (uniproc_executor.py:54) -> WorkerWrapperBase.worker (worker_base.py:338)
        # -> Worker.model_runner -> GPUModelRunner.get_model() (gpu_model_runner.py:3112-3120, unwraps CUDA graphs)
        model_runner = SimpleNamespace(model=engine_model, get_model=lambda: engine_model)
        driver_worker = SimpleNamespace(worker=SimpleNamespace(model_runner=model_runner), model_runner=model_runner)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=driver_worker),
                                          engine_core=SimpleNamespace(shutdown=self._shutdown),  # core_client.py:401
                                          is_sleeping=lambda: bool(self.sleeping_tags))  # llm_engine.py:443, core.py:1041

    def _engine_model(self):
        return self.llm_engine.model_executor.driver_worker.worker.model_runner.model

    def _shutdown(self, timeout=None):
        """InprocClient.shutdown (vllm/v1/engine/core_client.py:401-403) -> EngineCore.shutdown (core.py:824-839): the
        executor lets go of the model and the KV cache, then cleanup_dist_env_and_memory()."""
        if self._alive:
            self._alive = False
            _claimed.remove(self._claim)
            self.hf_model = self.llm_engine.model_executor.driver_worker = None
            _cleanup_dist_env_and_memory()

    def sleep(self, level=1, mode="abort"):  # vllm/entrypoints/llm.py:836-867 -> v1/executor/abstract.py:382-392
        if not self.enable_sleep_mode:
            raise ValueError("Sleep mode is not enabled: LLM(..., enable_sleep_mode=True)")
        if level >= 1:
            if "weights" in self.sleeping_tags:
                logger.warning("Executor is already sleeping.")
                return
            self.sleeping_tags |= {"weights", "kv_cache"}  # SLEEP_TAGS, abstract.py:37
            self._engine_model().asleep = True
            if level == 2:  # level 2 discards the weights: whatever is not reloaded before use is garbage
                for param in self._engine_model().parameters():
                    param.data.fill_(float("nan"))
        else:
            self.sleeping_tags.add("scheduling")

    def wake_up(self, tags=None):  # vllm/entrypoints/llm.py:869-887 -> v1/engine/core.py:997-1018, abstract.py:394-404
        tags = {"weights", "kv_cache", "scheduling"} if tags is None else set(tags)
        if not self.sleeping_tags:
            logger.warning("Executor is not sleeping.")
        self.sleeping_tags -= tags
        self._engine_model().asleep = "weights" in self.sleeping_tags
        if self.sleeping_tags == {"scheduling"}:  # the scheduler resumes once all executor memory is back
            self.sleeping_tags = set()
        return not self.sleeping_tags

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):  # llm.py:829-834
        return True

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, **kwargs):  # vllm/entrypoints/llm.py:418-470
        if not self._alive:
            raise RuntimeError("stand-in: the engine was shut down")
        if self.sleeping_tags:  # the scheduler is paused (core.py:959-975): real vLLM would never finish the requests
            raise RuntimeError(f"stand-in: generate() while the engine sleeps ({sorted(self.sleeping_tags)}): wake_up first")
        prompts = prompts if isinstance(prompts, list) else [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        self._engine_model().to_hf(self.hf_model)
        outputs = []
        for k, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
                raise NotImplementedError("stand-in: only TokensPrompt dicts {'prompt_token_ids': [...]} are modelled")
            ids = list(prompt["prompt_token_ids"])
            if len(ids) >= self.max_model_len:  # vllm/v1/engine/input_processor.py:587-605: room for one token
                raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of {self.max_model_len}.")
            max_tokens = min(p.max_tokens or self.max_model_len, self.max_model_len - len(ids))
            # with a seed, sample i of the n has its own, seed + i (vllm/v1/engine/parallel_sampling.py:76-81: each child
            # request a clone of the parameters with that seed); without one, all draw from the engine's
            generators = [torch.Generator().manual_seed(p.seed + i) if p.seed is not None else self.generator for i in range(p.n)]
            outputs.append(RequestOutput(str(k), None, ids, None, [self._complete(ids, p, max_tokens, g, i) for i, g in enumerate(generators)], True))
        return outputs

    @torch.no_grad()
    def _complete(self, ids, p, max_tokens, generator, index):
        """One sequence, one token at a time with the KV cache. Sampling from softmax(logits / T) (T = 0: argmax);
        the log-probs returned are raw (logprobs_mode "raw_logprobs", vllm/config/model.py:287-293: before
        temperature and the other processors)."""
        stop_ids = set(p.stop_token_ids or []) | self.eos_ids
        cache, tokens, logprobs, finish, stop_reason, cumulative = None, [], [], "length", None, 0.0
        inputs = torch.tensor([ids])
        # the KV cache's name: `cache` from transformers 5.24 on (which warns at `past_key_values`), `past_key_values` before
        cache_name = "cache" if "cache" in inspect.signature(self.hf_model.forward).parameters else "past_key_values"
        for _ in range(max_tokens):
            # logits of the last position only, as vLLM (logits_indices: each request's last token, v1/worker/
            # gpu_model_runner.py:2191, 4241); a few-shot prompt's prefill would otherwise make (T, V) of them
            out = self.hf_model(input_ids=inputs, **{cache_name: cache}, use_cache=True, logits_to_keep=1)
            cache, logits = getattr(out, cache_name), out.logits[0, -1].float()
            raw = logits.log_softmax(-1)
            if p.temperature == 0:
                token = int(logits.argmax())
            else:
                token = int(torch.multinomial((logits / p.temperature).softmax(-1), 1, generator=generator))
            tokens.append(token)
            cumulative += raw[token].item()
            if p.logprobs is not None:
                top = raw.topk(raw.numel() if p.logprobs == -1 else p.logprobs).indices.tolist()
                logprobs.append({t: Logprob(raw[t].item(), int((raw > raw[t]).sum()) + 1, self.tokenizer.decode([t]))
                                 for t in [token] + top})
            if token in stop_ids:
                finish, stop_reason = "stop", token if token in (p.stop_token_ids or []) else None
                break
            # Stop strings (vllm/v1/engine/detokenizer.py:132-155, check_stop_strings at :321-375), checked after every
            # token: the text ends before the stop string (or after it, with include_stop_str_in_output); token_ids
            # keep the token that completed it (output_processor.py:766-776).
            text = self.tokenizer.decode(tokens, skip_special_tokens=True) if p.stop else ""
            found = [(text.find(stop) + len(stop), k, stop) for k, stop in enumerate(p.stop) if stop in text]
            if found:  # the one that completes earliest, ties in list order (only this token's text can hold it)
                end, _, stop_reason = min(found)
                finish = "stop"
                break
            inputs = torch.tensor([[token]])
        # A stop token (eos or stop_token_ids) is left out of the text even when it is not a special token
        # (vllm/v1/engine/detokenizer.py:107-113, include_stop_str_in_output False), though it stays in token_ids
        stopped_on_token = finish == "stop" and not isinstance(stop_reason, str) and not p.include_stop_str_in_output
        text = self.tokenizer.decode(tokens[:-1] if stopped_on_token else tokens, skip_special_tokens=True)  # skip_special_tokens: True
        if isinstance(stop_reason, str):
            text = text[:end] if p.include_stop_str_in_output else text[:end - len(stop_reason)]
        return CompletionOutput(index, text, tokens, cumulative if p.logprobs is not None else None,
                                logprobs if p.logprobs is not None else None, finish, stop_reason)
