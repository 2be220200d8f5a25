"""Writes the RayService's serveConfigV2 from serve_app/config.yaml (+ cluster/kuberay/serve-overrides.yaml).

    python -m cluster.render           # rewrite cluster/kuberay/rayservice.yaml's serveConfigV2
    python -m cluster.render --check   # exit 1 if it differs from what would be written (CI, tests)
    python -m cluster.render --print   # the rendered Serve config, e.g. for `serve deploy` on a launcher cluster

One source for the Serve app's settings: the manifest's copy is generated, never edited.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = ROOT / "serve_app" / "config.yaml"
OVERRIDES = ROOT / "cluster" / "kuberay" / "serve-overrides.yaml"
RAYSERVICE = ROOT / "cluster" / "kuberay" / "rayservice.yaml"
KEY = "  serveConfigV2: |"
INDENT = "    "


def merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; lists of mappings with `name` merge by name; anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (
        isinstance(base, list)
        and isinstance(over, list)
        and all(isinstance(x, dict) and "name" in x for x in base + over)
    ):
        out = [copy.deepcopy(x) for x in base]
        names = [x["name"] for x in out]
        for item in over:
            if item["name"] not in names:
                raise ValueError(f"override names {item['name']!r}, which is not one of {names}")
            i = names.index(item["name"])
            out[i] = merge(out[i], item)
        return out
    return copy.deepcopy(over)


def serve_config() -> dict[str, Any]:
    return merge(yaml.safe_load(SERVE_CONFIG.read_text()), yaml.safe_load(OVERRIDES.read_text()) or {})


def render_text() -> str:
    return yaml.safe_dump(serve_config(), sort_keys=False, width=120)


def splice(manifest: str, body: str) -> str:
    """Replace the block scalar under `serveConfigV2: |` (its lines indented deeper than the key) with body."""
    lines = manifest.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == KEY)
    end = start + 1
    while end < len(lines) and (lines[end].startswith(INDENT) or not lines[end].strip()):
        end += 1
    block = [INDENT + line if line.strip() else "\n" for line in body.splitlines(keepends=True)]
    return "".join(lines[: start + 1] + block + lines[end:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if the manifest is out of date")
    ap.add_argument("--print", action="store_true", help="print the rendered Serve config and exit")
    a = ap.parse_args(argv)
    if a.print:
        print(render_text(), end="")
        return 0
    current = RAYSERVICE.read_text()
    wanted = splice(current, render_text())
    if a.check:
        if current != wanted:
            print(
                f"{RAYSERVICE.relative_to(ROOT)}: serveConfigV2 differs from serve_app/config.yaml + overrides; "
                "run python -m cluster.render",
                file=sys.stderr,
            )
            return 1
        print("serveConfigV2 is up to date")
        return 0
    RAYSERVICE.write_text(wanted)
    print(f"wrote {RAYSERVICE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
