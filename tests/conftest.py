import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DOMAINS = ["auto_and_commute", "banking", "credit_cards", "home", "kitchen_and_dining", "meta", "small_talk",
           "travel", "utility", "work"]


@pytest.fixture(scope="session")
def smollm2_path():
    from textclf.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)
