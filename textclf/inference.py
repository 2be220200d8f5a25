"""Classification with a vLLM engine: the answer is always one of the labels, with its probability.

When every label starts with its own token (checked under the model's tokenizer), one engine step scores all
labels at once (`logprob_token_ids`) and the probabilities are a softmax over the labels' first tokens. vLLM returns
at most 128 token ids per request: a larger label set is scored by one request per 128 labels on the same prompt,
each of which computes the prompt's text (only the shared instruction's full cache blocks are reused), so 129-256
labels cost twice the engine time of 128 (bench/results/chaos-admission-latency.md, "Many labels").
Otherwise decoding is constrained to the label strings (structured `choice`) and the probability is that of
the chosen label's tokens. Free generation followed by parsing is never used.
Shared by the evaluation job (offline `LLM`) and the Serve app (`AsyncLLM`); the model kinds (textclf.kinds) pick
their runner and scoring.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .collector import collector_paused, freeze_imports
from .prompts import PromptFormat


@dataclass(frozen=True)
class ScoringPlan:
    labels: tuple[str, ...]
    first_token_ids: Optional[tuple[int, ...]]  # None: constrained multi-step choice
    answers: Optional[tuple[str, ...]] = None  # what the model writes for each label (None: the label)

    @property
    def one_step(self) -> bool:
        return self.first_token_ids is not None


def scoring_plan(fmt: PromptFormat, tokenizer) -> ScoringPlan:
    if fmt.first_tokens_distinct(tokenizer):
        return ScoringPlan(fmt.labels, tuple(ids[0] for ids in fmt.label_token_ids(tokenizer)), fmt.answers)
    return ScoringPlan(fmt.labels, None, fmt.answers)


def sampling_params(plan: ScoringPlan, max_label_tokens: int = 16) -> list:
    """The engine requests for one text: one per chunk of the labels' first tokens that vLLM takes in a request (one
    step scoring), or one constrained choice."""
    from vllm import SamplingParams
    from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS, StructuredOutputsParams

    if plan.one_step:
        ids = list(plan.first_token_ids)
        # detokenize=False: the answer is read from the labels' token ids; no text is needed
        return [
            SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprob_token_ids=ids[i : i + MAX_LOGPROB_TOKEN_IDS],
                detokenize=False,
            )
            for i in range(0, len(ids), MAX_LOGPROB_TOKEN_IDS)
        ]
    return [
        SamplingParams(
            max_tokens=max_label_tokens,
            temperature=0.0,
            logprobs=0,  # asks for the chosen tokens' log-probabilities, hence cumulative_logprob
            structured_outputs=StructuredOutputsParams(choice=list(plan.answers or plan.labels)),
        )
    ]


def _softmax(logprobs: Sequence[float]) -> list[float]:
    m = max(logprobs)
    exps = [math.exp(x - m) for x in logprobs]
    s = sum(exps)
    return [e / s for e in exps]


def parse_output(plan: ScoringPlan, completions: Sequence[Any]) -> dict[str, Any]:
    """`completions`: the vLLM CompletionOutput (RequestOutput.outputs[0]) of each of `sampling_params`' requests."""
    if plan.one_step:
        step = {t: lp for c in completions for t, lp in c.logprobs[0].items()}  # the log-softmax is over the vocabulary
        lps = [step[t].logprob if t in step else -math.inf for t in plan.first_token_ids]
        probs = _softmax(lps)
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": plan.labels[best], "confidence": probs[best], "scores": dict(zip(plan.labels, probs))}
    (completion,) = completions
    text = completion.text.strip()
    answers = plan.answers or plan.labels
    if text not in answers:  # cannot happen under the grammar; refuse rather than guess
        raise RuntimeError(f"constrained decoding returned {text!r}, not a label")
    label = plan.labels[answers.index(text)]
    cum = completion.cumulative_logprob
    prob = math.exp(cum) if cum is not None else float("nan")
    return {"label": label, "confidence": prob, "scores": {label: prob}}


def needs_engine_tokenizer(params: Sequence[Any]) -> bool:
    """Whether vLLM must load a tokenizer of its own for these requests: for text out (detokenize) or a grammar
    (structured outputs). Prompts always go in as token ids, so one-step scoring and pooling need none, and the
    engine then starts without it (bench/results/engine-start.md, "vLLM's own tokenizer")."""
    return any(getattr(p, "detokenize", False) or getattr(p, "structured_outputs", None) is not None for p in params)


def top_k(scores: dict[str, float], k: int) -> dict[str, float]:
    return dict(sorted(scores.items(), key=lambda kv: -kv[1])[:k])


GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")  # NVIDIA's kernel driver, ROCm's, WSL2's


def on_gpu() -> bool:
    """Whether torch sees a CUDA (or ROCm) device. Without a GPU driver on the machine it cannot, and torch (seconds
    to import) is not imported to ask: a replica starts its engine's preload server first (serve_app/engine_preload)."""
    if not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls run natively only with AVX-512 BF16 or AMX; elsewhere vLLM falls back to slow torch kernels
    (bench/results/MEASUREMENTS.md)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class EngineSettings:
    """The engine settings a user configures: the evaluation's (`eval:` keys) and the server's (`engine:`), each
    with its own defaults, both turned into vLLM's arguments by `engine_kwargs`."""

    max_num_seqs: int
    kv_cache_gib: float  # CPU: the KV cache size
    gpu_memory_utilization: float  # GPU: the fraction of its memory vLLM may take


CPU_BLOCK_TOKENS = 32


RECURRENT_CONFIG_KEYS = ("mamba", "ssm", "linear_attn", "layers_block_type", "hybrid")


def kv_bytes_per_token(model_path: str, dtype_bytes: int) -> Optional[int]:
    """What a decoder caches per token, keys and values of every layer, from its config; None when the config does
    not say, or the model keeps recurrent state (Mamba, linear attention), which vLLM pages in its own way.
    Grouped-query heads are counted; MLA and sliding-window layers, which vLLM caches smaller, count as full
    attention."""
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model_path).get_text_config()
        layer_types = set(getattr(c, "layer_types", None) or ())
        if layer_types - {"full_attention", "sliding_attention"} or any(
            k in key for key in c.to_dict() for k in RECURRENT_CONFIG_KEYS
        ):
            return None
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return 2 * c.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    except Exception:  # no config, or an architecture without these fields: vLLM gets the configured size
        return None


def kv_cache_bytes(model_path: str, max_model_len: int, settings: EngineSettings, dtype_bytes: int) -> int:
    """The CPU KV cache: what max_num_seqs sequences of max_model_len tokens can fill, at most kv_cache_gib. vLLM
    zero-fills the whole cache at start (~1 s a GiB on 2 cores, more in a Ray worker: bench/results/eval-actor-cost.md),
    and a classifier's prompts are short."""
    configured = int(settings.kv_cache_gib * (1 << 30))
    per_token = kv_bytes_per_token(model_path, dtype_bytes)
    if per_token is None:
        return configured
    blocks = settings.max_num_seqs * math.ceil(max_model_len / CPU_BLOCK_TOKENS) + 1  # vLLM holds one block back
    return min(configured, blocks * CPU_BLOCK_TOKENS * per_token)


def engine_kwargs(
    model_path: str,
    max_model_len: int,
    settings: EngineSettings,
    *,
    enable_lora: bool = False,
    max_loras: int = 1,
    max_lora_rank: int = 16,
    runner: str = "generate",
    pooling: Optional[str] = None,
    tokenizer: bool = True,
) -> dict[str, Any]:
    """Engine settings that start on a CPU-only machine as well as on a GPU. runner "pooling": a classification
    head (the encoder kind), whose requests share no prompt prefix; `pooling`: the head's sequence pooling
    (classifier.json's "pooling"; None: the architecture's own); `tokenizer`: whether the requests need vLLM's own
    (`needs_engine_tokenizer`)."""
    kw: dict[str, Any] = dict(
        model=model_path,
        max_model_len=max_model_len,
        max_num_seqs=settings.max_num_seqs,
        enable_prefix_caching=runner == "generate",  # every prompt shares the instruction and label list
        seed=0,
    )
    if not tokenizer:
        kw["skip_tokenizer_init"] = True
    if runner != "generate":
        kw["runner"] = runner
    if pooling:
        from vllm.config import PoolerConfig

        kw["pooler_config"] = PoolerConfig(seq_pooling_type=pooling)
    if on_gpu():
        kw.update(dtype="auto", gpu_memory_utilization=settings.gpu_memory_utilization)
    else:
        # On CPU the utilization fraction sizes host memory (the default 0.92 fails): size the KV cache directly.
        # Blocks of 32 tokens (the CPU backend's smallest) let prefix caching reuse the shared instruction;
        # with the default size it rarely fills a block.
        dtype, dtype_bytes = ("bfloat16", 2) if cpu_has_native_bf16() else ("float32", 4)
        kw.update(
            dtype=dtype,
            enforce_eager=True,
            kv_cache_memory_bytes=kv_cache_bytes(model_path, max_model_len, settings, dtype_bytes),
            block_size=CPU_BLOCK_TOKENS,
        )
    if enable_lora:
        kw.update(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank)
    return kw


def engine_in_one_process() -> None:
    """On CPU, run vLLM's model worker inside its engine instead of in a process of its own: a process start costs a
    fresh import of vLLM and torch, about half of the engine's start (bench/results/engine-start.md). The offline
    `LLM` then runs in the caller's process; `AsyncLLM` keeps one EngineCore process. VLLM_ENABLE_V1_MULTIPROCESSING
    set by the user wins."""
    if not on_gpu():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def no_compile_on_cpu() -> None:
    """On CPU the engine runs eager (engine_kwargs), yet vLLM still torch.compiles small helpers on first use (the
    sampler's logprob ranks): inductor builds C++ during the first request, seconds of the engine's start
    (bench/results/engine-start.md). TORCH_COMPILE_DISABLE runs them as plain torch, same answers; it reaches the
    engine processes that vLLM starts, and this process, whose torch has read it already. Set by the user, it wins
    (an empty value counts as unset)."""
    if on_gpu():
        return
    no_compile_env()
    import torch._dynamo.config

    torch._dynamo.config.disable = os.environ["TORCH_COMPILE_DISABLE"] == "1"


def no_compile_env() -> None:
    """no_compile_on_cpu's variable alone, for a process that imports torch after this (torch reads it then)."""
    if not os.environ.get("TORCH_COMPILE_DISABLE"):
        os.environ["TORCH_COMPILE_DISABLE"] = "1"


def cores_of(mask: Optional[str]) -> set[int]:
    """The cores a VLLM_CPU_OMP_THREADS_BIND list names ("0", "0,2", "0-3", "0-1|2-3"); empty for auto/nobind/all."""
    cores: set[int] = set()
    for part in (mask or "").replace("|", ",").split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return set()
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def bind_engine_cores(bind: str) -> None:
    """Bind vLLM's CPU engine to `bind` (VLLM_CPU_OMP_THREADS_BIND), and give it one OpenMP thread per bound core:
    Ray sets OMP_NUM_THREADS to an actor's CPU reservation, and vLLM keeps torch at that count
    (bench/results/engine-start.md). OpenMP reads it once, for every thread, when torch loads it: an engine in this
    process gets the count only if set before torch is imported, the engine processes it starts always."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    if threads := len(cores_of(bind)):
        os.environ["OMP_NUM_THREADS"] = str(threads)


def bind_engine_threads(cpu_threads_bind: Optional[str]) -> None:
    """vLLM binds its CPU engine to one core and keeps the other for itself by default; a batch job has nothing
    else to run."""
    if cpu_threads_bind and not on_gpu():
        bind_engine_cores(f"0-{os.cpu_count() - 1}" if cpu_threads_bind == "all" else cpu_threads_bind)


def engine_output(runner: str, request_output) -> Any:
    """What a kind's scorer parses: the completion (generate runner) or the pooling output (pooling runner)."""
    return request_output.outputs if runner == "pooling" else request_output.outputs[0]


class BatchClassifier:
    """A vLLM engine that classifies batches of texts with the classifier's kind (its runner, tokens and scoring);
    the Ray Data evaluation maps it over the validation and test splits. Input columns other than text and label (row
    tags) come back unchanged.

    On CPU one thread of its own builds the engine and runs every batch: vLLM's CPU worker binds the OpenMP threads
    of the thread that builds it, and Ray Data calls a class's __call__ from another thread than its constructor."""

    def __init__(
        self,
        model_dir: str,
        meta: dict[str, Any],
        engine: EngineSettings,
        adapter_dir: Optional[str] = None,
        cpu_threads_bind: Optional[str] = "all",
    ):
        self._engine_thread = None if on_gpu() else ThreadPoolExecutor(1, thread_name_prefix="textclf-engine")
        with collector_paused():
            self._on_engine_thread(self._build, model_dir, meta, engine, adapter_dir, cpu_threads_bind)

    def _on_engine_thread(self, fn, *args):
        return fn(*args) if self._engine_thread is None else self._engine_thread.submit(fn, *args).result()

    def _build(
        self,
        model_dir: str,
        meta: dict[str, Any],
        engine: EngineSettings,
        adapter_dir: Optional[str],
        cpu_threads_bind: Optional[str],
    ) -> None:
        bind_engine_threads(cpu_threads_bind)  # before torch loads OpenMP, which reads OMP_NUM_THREADS then
        from transformers import AutoTokenizer
        from vllm import LLM

        from .kinds import kind_of

        freeze_imports()
        kind = kind_of(meta)
        if adapter_dir:
            kind.check_servable({"kind": "adapter"}, adapter_dir)
        engine_in_one_process()
        no_compile_on_cpu()
        self.fmt = PromptFormat.from_dict(meta["prompt"])
        self.tokenizer = AutoTokenizer.from_pretrained(adapter_dir or model_dir)
        self.scorer = kind.scorer(self.fmt, self.tokenizer)
        self.runner = kind.runner
        self.llm = LLM(
            **engine_kwargs(
                model_dir,
                self.fmt.max_length,
                engine,
                enable_lora=adapter_dir is not None,
                runner=kind.runner,
                pooling=meta.get("pooling"),
                tokenizer=needs_engine_tokenizer(self.scorer.params),
            )
        )
        self.lora = None
        if adapter_dir:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("classifier", 1, adapter_dir)

    def classify(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        return self._on_engine_thread(self._classify, texts)

    def _classify(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        encoded = [self.scorer.encode(t) for t in texts]
        per_text = len(self.scorer.params)  # engine requests per text (Scorer.params)
        prompts = [{"prompt_token_ids": e.input_ids} for e in encoded for _ in range(per_text)]
        params = list(self.scorer.params) * len(encoded)
        if self.runner == "pooling":
            outputs = self.llm.encode(prompts, params, use_tqdm=False, lora_request=self.lora, pooling_task="classify")
        else:
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        outputs = [engine_output(self.runner, out) for out in outputs]
        return [
            {**self.scorer.parse(outputs[i * per_text : (i + 1) * per_text]), "truncated": e.truncated}
            for i, e in enumerate(encoded)
        ]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        results = self.classify([str(t) for t in batch["text"]])
        return {
            **{k: list(v) for k, v in batch.items() if k not in ("text", "label")},  # row tags pass through
            "text": list(batch["text"]),
            "gold": list(batch["label"]),
            "predicted": [r["label"] for r in results],
            "probability": [r["confidence"] for r in results],
            "truncated": [r["truncated"] for r in results],
        }
