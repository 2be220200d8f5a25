"""`textclf.serving.Engine` over vLLM's AsyncLLM: the engine a replica owns, in an EngineCore process of its own
(`engine.process: separate`, the default; serve_app/inline_engine.py keeps it inside the replica)."""

from __future__ import annotations

from typing import Any

from textclf.collector import freeze_imports
from textclf.inference import engine_in_one_process, engine_kwargs, engine_output, no_compile_on_cpu
from textclf.serving import ClassifierSpec, ServeConfig, ServingPlan


def engine_setup(
    plan: ServingPlan, cfg: ServeConfig, tokenizer: bool = True
) -> tuple[dict[str, Any], dict[str, Any], list | None]:
    """What both engines are built from: (vLLM engine arguments, one LoRARequest per configured adapter by
    classifier name, the stat loggers). `tokenizer`: whether the requests need vLLM's own (`engine_needs_tokenizer`)."""
    # vLLM takes seconds to import: only replicas load it, not the builder or the tests that import the app
    from vllm.lora.request import LoRARequest
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    freeze_imports()  # vLLM imported (the callers' imports first): the collections as the engine builds skip it
    no_compile_on_cpu()  # before the engine starts, in this process or its own
    kw = engine_kwargs(
        plan.engine_model,
        plan.max_model_len,
        cfg.engine.settings(),
        enable_lora=plan.enable_lora,
        max_loras=plan.max_loras,
        max_lora_rank=plan.max_lora_rank,
        runner=plan.runner,
        pooling=plan.pooling,
        tokenizer=tokenizer,
    )
    # no periodic stats log lines; with engine.stats the Ray logger still records vLLM's metrics (ray_vllm_*)
    kw["disable_log_stats"] = True
    loras = {s.name: LoRARequest(s.name, s.lora_id, s.adapter_dir) for s in plan.classifiers.values() if s.adapter_dir}
    return kw, loras, [RayPrometheusStatLogger] if cfg.engine.stats else None


class VllmEngine:
    """One AsyncLLM for the plan's model; one LoRARequest per configured adapter."""

    def __init__(self, plan: ServingPlan, cfg: ServeConfig, tokenizer: bool = True):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kw, self.loras, loggers = engine_setup(plan, cfg, tokenizer)
        self.runner = plan.runner  # pooling: a classification head's class probabilities from AsyncLLM.encode
        engine_in_one_process()
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw), stat_loggers=loggers)

    async def complete(self, prompt_token_ids: list[int], params: Any, request_id: str, spec: ClassifierSpec) -> Any:
        final = None
        run = self.llm.encode if self.runner == "pooling" else self.llm.generate
        async for out in run(
            {"prompt_token_ids": prompt_token_ids},
            params,
            request_id=request_id,
            lora_request=self.loras.get(spec.name),
        ):
            final = out
        if final is None or not final.outputs:
            raise RuntimeError("the engine returned no output")
        return engine_output(self.runner, final)

    async def check_health(self) -> None:
        await self.llm.check_health()

    @property
    def errored(self) -> bool:
        return self.llm.errored

    def shutdown(self) -> None:
        self.llm.shutdown()
