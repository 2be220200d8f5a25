"""The classify core: texts to predictions with any engine that follows the small `Engine` protocol (vLLM in
serve_app/engine.py, a fake one in the unit tests); the same prompt tokens and scoring as the evaluation job."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

from ..export import prompt_format
from ..inference import needs_engine_tokenizer, top_k
from ..kinds import kind_of
from ..kinds.base import Scorer
from ..prompts import Encoded, PromptFormat
from .admission import AdaptiveLimit
from .config import ServeConfig
from .errors import EngineUnavailable, Overloaded, ServingError, TooLarge, UnknownClassifier
from .plan import ClassifierSpec, ServingPlan


class Engine(Protocol):
    """What the core needs from an engine: one finished completion for a prompt of token ids (for an encoder,
    given pooling params: the pooling output, class probabilities)."""

    async def complete(
        self, prompt_token_ids: list[int], params: Any, request_id: str, spec: ClassifierSpec
    ) -> Any: ...

    async def check_health(self) -> None: ...

    @property
    def errored(self) -> bool: ...


def apply_abstain(result: dict[str, Any], threshold: Optional[float]) -> dict[str, Any]:
    """Below the threshold the label is withheld (null) and the prediction flagged for review; scores stay."""
    if threshold is not None and not (result["confidence"] >= threshold):
        return {**result, "label": None, "needs_review": True}
    return {**result, "needs_review": False}


@dataclass
class _Loaded:
    spec: ClassifierSpec
    fmt: PromptFormat
    scorer: Scorer  # the kind's encode, engine params and parse

    def encode(self, text: str) -> Encoded:
        return self.scorer.encode(text)

    @property
    def params(self) -> list:
        return self.scorer.params

    def parse(self, outs: list) -> dict[str, Any]:
        return self.scorer.parse(outs)


def load_classifiers(plan: ServingPlan, tokenizers: Optional[dict[str, Any]] = None) -> dict[str, _Loaded]:
    """Each classifier's prompt format and scorer, with its tokenizer (given, else loaded from its run)."""
    loaded = {}
    for name, spec in plan.classifiers.items():
        tok = (tokenizers or {}).get(name)
        if tok is None:
            from transformers import AutoTokenizer  # loads torch: only where no tokenizer is given

            tok = AutoTokenizer.from_pretrained(spec.tokenizer_dir)
        fmt = prompt_format(spec.meta)
        loaded[name] = _Loaded(spec, fmt, kind_of(spec.meta).scorer(fmt, tok))
    return loaded


def engine_needs_tokenizer(loaded: dict[str, _Loaded]) -> bool:
    """Whether any classifier's requests need vLLM's own tokenizer (`textclf.inference.needs_engine_tokenizer`)."""
    return any(needs_engine_tokenizer(c.params) for c in loaded.values())


class Classifiers:
    """Classifies texts with the engine for each configured classifier; the same prompt tokens and scoring as the
    evaluation job (`textclf.inference`)."""

    def __init__(
        self,
        cfg: ServeConfig,
        plan: ServingPlan,
        engine: Engine,
        loaded: Optional[dict[str, _Loaded]] = None,
    ):
        """`loaded`: the plan's classifiers from `load_classifiers` (loaded here when not given)."""
        self.cfg, self.plan, self.engine = cfg, plan, engine
        self.inflight = 0  # texts admitted and not answered yet (one event loop: no lock)
        self.admission = AdaptiveLimit(cfg.inflight_limit, cfg.target_latency_s)
        self.last_answer = float("-inf")  # time.monotonic() of the engine's latest answer
        self.loaded = loaded if loaded is not None else load_classifiers(plan)

    @property
    def names(self) -> list[str]:
        return list(self.loaded)

    def labels(self) -> dict[str, list[str]]:
        return {n: list(c.fmt.labels) for n, c in self.loaded.items()}

    def get(self, name: Optional[str]) -> _Loaded:
        name = name or self.plan.default
        if name not in self.loaded:
            raise UnknownClassifier(f"unknown classifier {name[:64]!r}", {"valid": self.names})
        return self.loaded[name]

    def threshold(self, c: _Loaded, requested: Optional[float] = None) -> Optional[float]:
        """The request's threshold, else the server's, else the one the evaluation chose for this classifier."""
        for t in (requested, self.cfg.abstain_threshold, c.spec.meta.get("abstain_threshold")):
            if t is not None:
                return float(t)
        return None

    def thresholds(self) -> dict[str, Optional[float]]:
        """Each classifier's default threshold (no request override)."""
        return {n: self.threshold(c) for n, c in self.loaded.items()}

    def check_texts(self, texts: Sequence[str]) -> None:
        if len(texts) > self.cfg.max_batch:
            raise TooLarge(f"batch of {len(texts)} texts is over the limit of {self.cfg.max_batch}")
        long = [i for i, t in enumerate(texts) if len(t) > self.cfg.max_text_chars]
        if long:
            raise TooLarge(f"text over the limit of {self.cfg.max_text_chars} characters", {"indices": long[:10]})

    async def _complete(self, c: _Loaded, input_ids: list[int], timeout: float) -> dict[str, Any]:
        """The engine's parsed answer within timeout; any engine failure as EngineUnavailable."""
        try:
            requests = [self.engine.complete(input_ids, p, uuid.uuid4().hex, c.spec) for p in c.params]
            r = c.parse(await asyncio.wait_for(asyncio.gather(*requests), timeout))
        except ServingError:
            raise
        except asyncio.TimeoutError as exc:
            raise EngineUnavailable(f"the engine did not answer within {timeout}s") from exc
        except Exception as exc:  # a dead or failing engine
            raise EngineUnavailable(f"engine failure: {type(exc).__name__}: {exc}"[:500]) from exc
        self.last_answer = time.monotonic()
        return r

    async def _one(self, c: _Loaded, text: str, threshold: Optional[float], details: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        enc = c.encode(text)
        out = await self._complete(c, enc.input_ids, self.cfg.request_timeout_s)
        r = {
            "label": out["label"],
            "confidence": float(out["confidence"]),
            "scores": top_k(out["scores"], self.cfg.top_k),
            "model": c.spec.name,
            "truncated": enc.truncated,
        }
        r = apply_abstain(r, threshold)
        if details:  # every label's probability (0 where constrained decoding scored one) and the prompt's length
            r["probs"] = [float(out["scores"].get(label, 0.0)) for label in c.fmt.labels]
            r["prompt_tokens"] = len(enc.input_ids)
        r["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return r

    def admit(self, n: int) -> None:
        """Refuse at once what the engine could not answer within the latency target (or over max_inflight_texts),
        counted in texts: a batch weighs what it carries."""
        a = self.admission
        if not a.admits(self.inflight, n):
            raise Overloaded(
                f"server busy: {self.inflight} texts in progress, limit {a.limit}; retry later",
                {
                    "inflight_texts": self.inflight,
                    "limit": a.limit,
                    "max_inflight_texts": self.cfg.inflight_limit,
                    "target_latency_s": a.target,
                },
            )

    async def classify(
        self,
        texts: Sequence[str],
        model: Optional[str] = None,
        abstain_threshold: Optional[float] = None,
        details: bool = False,
    ) -> list[dict[str, Any]]:
        c = self.get(model)
        self.check_texts(texts)
        threshold = self.threshold(c, abstain_threshold)
        if self.engine.errored:
            raise EngineUnavailable("the engine is not running")
        self.admit(len(texts))
        self.inflight += len(texts)
        key, answered = self.admission.begin(), False
        try:
            results = list(await asyncio.gather(*(self._one(c, t, threshold, details) for t in texts)))
            answered = True
            return results
        finally:
            self.inflight -= len(texts)
            self.admission.end(key, answered)

    async def check_health(self) -> None:
        """Serve's health check: raises when the engine is dead (at once) or answers no probe text within
        health_probe_timeout_s, so that Serve replaces the replica. A recent answer to a real request proves
        liveness, so a busy replica is not probed behind its own queue."""
        if self.engine.errored:
            raise EngineUnavailable("the engine is not running")
        window = self.cfg.health_probe_timeout_s
        started = time.monotonic()
        if started - self.last_answer < window:
            return
        c = self.get(None)
        try:
            await self._complete(c, c.encode("health probe").input_ids, window)
        except EngineUnavailable:
            if self.last_answer >= started and not self.engine.errored:
                return  # real requests were answered meanwhile: slow, not stalled
            raise

    async def ready(self) -> tuple[bool, str]:
        """Engine loaded and answering: a health check and one real classification within ready_timeout_s."""
        try:
            await asyncio.wait_for(self.engine.check_health(), self.cfg.ready_timeout_s)
            await asyncio.wait_for(self.classify(["ready?"]), self.cfg.ready_timeout_s)
            return True, "ok"
        except asyncio.TimeoutError:
            return False, f"the engine did not answer within {self.cfg.ready_timeout_s}s"
        except ServingError as exc:
            return False, exc.message
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"[:500]
