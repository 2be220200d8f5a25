"""Model kinds, one module each behind `ModelKind` (textclf/kinds/base.py), found by name in `KINDS`.

Jobs, export and the server ask this table for a kind's defaults, tokenization, trainer, merge, batch classifier and
serving scorer; nothing outside it compares kind names. Adding a kind: one module here and one line in `KINDS`.
Modules load on first use, so the configuration can read a kind's defaults without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import ModelKind

KINDS: dict[str, str] = {
    "generative": "textclf.kinds.generative:GenerativeKind",
    "encoder": "textclf.kinds.encoder:EncoderKind",
    "decoder-head": "textclf.kinds.decoder_head:DecoderHeadKind",
}
DEFAULT_KIND = "generative"
_loaded: dict[str, ModelKind] = {}


def names() -> list[str]:
    return list(KINDS)


def get_kind(name: str) -> ModelKind:
    if name not in KINDS:
        raise ValueError(f"model_kind must be one of {', '.join(KINDS)}, not {name!r}")
    if name not in _loaded:
        module, cls = KINDS[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


def kind_of(meta: dict[str, Any]) -> ModelKind:
    """The kind of an exported classifier (classifier.json); runs from before kinds existed are generative."""
    return get_kind(meta.get("model_kind", DEFAULT_KIND))
