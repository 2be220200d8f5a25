"""Step 3: merge the run's LoRA adapter into its base model: <run>/merged/, a plain checkpoint for vLLM.

    python -m ray_jobs.export --name <run> [--runs-dir runs]

Needs no cluster: merging reads and writes one checkpoint, so it runs in this process.
"""

from __future__ import annotations

import logging
from pathlib import Path

from textclf.config import Config, parse_args
from textclf.export import merge_adapter, read_meta
from textclf.models import resolve_model

from .common import open_run, setup_logging, sync_run
from .console import say

log = logging.getLogger("ray_jobs.export")


def export(cfg: Config, run_dir: Path) -> Path:
    adapter = run_dir / "adapter"
    meta = read_meta(adapter)
    out = merge_adapter(adapter, run_dir / "merged", resolve_model(meta["base_model"], cfg.model.model_cache_dir))
    log.info("merged model written to %s", out)
    return out


def main(argv=None) -> None:
    setup_logging()
    cfg = parse_args(argv, description=__doc__)
    run_dir = open_run(cfg)
    out = export(cfg, run_dir)
    sync_run(cfg, run_dir)
    say(f"merged: {out}")


if __name__ == "__main__":
    main()
