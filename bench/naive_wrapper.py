"""The baseline of `make bench-serve` (not for use): the naive way to put an API on vLLM. A FastAPI app whose
sync endpoint calls vLLM's OpenAI-compatible server with the sync OpenAI client, generates 5 tokens freely
and parses a label out of the text. Same prompt as textclf (the classifier folder's classifier.json).

    NAIVE_UPSTREAM=http://127.0.0.1:8101/v1 NAIVE_MODEL=clf NAIVE_CLASSIFIER_DIR=<folder> \
        uvicorn bench.naive_wrapper:app --host 127.0.0.1 --port 8102
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import FastAPI
from openai import OpenAI
from pydantic import BaseModel
from transformers import AutoTokenizer

from textclf.export import prompt_format, read_meta

FOLDER = os.environ["NAIVE_CLASSIFIER_DIR"]
FMT = prompt_format(read_meta(Path(FOLDER)))
TOKENIZER = AutoTokenizer.from_pretrained(FOLDER)
CLIENT = OpenAI(base_url=os.environ["NAIVE_UPSTREAM"], api_key="unused", max_retries=0)
MODEL = os.environ.get("NAIVE_MODEL", "clf")

app = FastAPI()


class Req(BaseModel):
    text: str


def parse(output: str) -> str | None:
    out = output.strip().lower()
    for label in FMT.labels:
        if out.startswith(label.lower()):
            return label
    return next((label for label in FMT.labels if label.lower() in out), None)


@app.post("/classify")
def classify(req: Req) -> dict:
    t0 = time.perf_counter()
    resp = CLIENT.completions.create(
        model=MODEL,
        prompt=FMT.prompt(TOKENIZER, req.text),
        max_tokens=5,
        temperature=0.0,
        extra_body={"add_special_tokens": False},
    )
    return {"label": parse(resp.choices[0].text), "latency_ms": (time.perf_counter() - t0) * 1000}
