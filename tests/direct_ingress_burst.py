"""For tests/test_replica_gate.py, in a process of its own (the serving environment must be set before ray.serve is
imported):

    python tests/direct_ingress_burst.py RUN N MAX_ONGOING

A local Ray + Serve in the serving environment (direct ingress, serve_app/local.py) serves RUN with one replica
taking MAX_ONGOING requests at once; N requests at once go to that replica's own port, then one more after them.
Prints one JSON line: the statuses, the refusals' reasons and limits, whether each refusal was the API's JSON with
Retry-After, and the status of the last request.
"""

import asyncio
import json
import re
import sys
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/support.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.local import LocalServe, free_port, ingress_urls  # noqa: E402


async def burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)) as c:
        texts = [f"my card {i} was declined" for i in range(n)]
        return await asyncio.gather(*(c.post("/classify", json={"text": t}) for t in texts))


def main(run: str, n: int, max_ongoing: int) -> None:
    di = free_port()
    with LocalServe(di_ports=(di, di + 10)) as cluster:
        from support import ONE_REPLICA, run_app  # imports ray.serve: after LocalServe set the environment

        cluster.run(run_app(Path(run), deployment={**ONE_REPLICA, "max_ongoing_requests": max_ongoing}))
        (url,) = ingress_urls()
        answers = asyncio.run(burst(url, n))
        after = httpx.post(f"{url}/classify", json={"text": "where is my package"}, timeout=300).status_code
    refused = [r for r in answers if r.status_code != 200]
    json_answers = [r for r in refused if r.headers.get("content-type") == "application/json"]
    messages = [r.json()["error"]["message"] for r in json_answers] + [r.text for r in refused if r not in json_answers]
    print(
        json.dumps(
            {
                "statuses": Counter(str(r.status_code) for r in answers),
                "reasons": Counter(m.split(":")[0] for m in messages),
                "limits": sorted({int(x) for m in messages for x in re.findall(r"limit (\d+)", m)}),
                "refusals_in_json_with_retry_after": sum("retry-after" in r.headers for r in json_answers),
                "after": after,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
