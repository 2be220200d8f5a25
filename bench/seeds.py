"""Benchmark, not a test: one kind's whole pipeline at several training seeds, to show how far the test macro-F1 moves
with the seed alone (the head's and the adapter's initialization and the data order; the splits stay fixed).

    python -m bench.seeds [--kind encoder] [--seeds 1,2,3] [--config run.yaml] [--key value ...]

Each seed is a full run (prepare, Ray Train, export, Ray Data + vLLM evaluation) with the kind's defaults and the
given overrides. Writes <runs-dir>/seeds-<kind>.md and .json and prints the table: per seed macro-F1, accuracy and
training time, then the mean, min and max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ray_jobs.common import setup_logging
from ray_jobs.pipeline import run_pipeline
from textclf.config import config_overrides, load_config


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="encoder", help="generative or encoder")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--config", default=None, help="a run YAML (e.g. configs/smoke.yaml for a plumbing check)")
    args, rest = ap.parse_known_args(argv)
    setup_logging()
    overrides = config_overrides(ap, rest)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = load_config(
            args.config,
            {**overrides, "model_kind": args.kind, "seed": str(seed), "name": f"seeds-{args.kind}-{stamp}-s{seed}"},
        )
        run_dir, summary = run_pipeline(cfg)
        rows.append(
            {
                "seed": seed,
                "run": str(run_dir),
                "macro_f1": summary["macro_f1"],
                "accuracy": summary["accuracy"],
                "train_s": summary["timings"]["train_s"],
            }
        )
        print(f"[seeds] {json.dumps(rows[-1])}", flush=True)
    f1 = [r["macro_f1"] for r in rows]
    setting = (
        f"{cfg.model.model}, the kind's defaults"
        + (f" from {args.config}" if args.config else "")
        + (f" with {overrides}" if overrides else "")
        + f"; learning rate {cfg.train.learning_rate:g}, "
        f"{cfg.train.num_epochs:g} epochs (max_steps {cfg.train.max_steps}); test rows {summary['n']}."
    )
    lines = [
        f"# {args.kind}: test macro-F1 by training seed ({time.strftime('%Y-%m-%d %H:%M')}, this machine)",
        "",
        setting,
        "",
        "| seed | macro-F1 | accuracy | training (s) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['seed']} | {r['macro_f1']:.4f} | {r['accuracy']:.4f} | {r['train_s']:.0f} |" for r in rows]
    lines += ["", f"mean {statistics.mean(f1):.4f}, min {min(f1):.4f}, max {max(f1):.4f} over {len(f1)} seeds"]
    out = Path(cfg.run.runs_dir) / f"seeds-{args.kind}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
