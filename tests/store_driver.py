"""A generate-and-filter run over r1cli.sample.store without a model: every prompt's rows are a fixed function of
its index, scoring takes `delay` seconds per prompt (a slow reward), and big rows make a batch's rows and marks
far larger than any write buffer. `python tests/store_driver.py OUT PROMPTS PER_BATCH DELAY` runs it to the end."""

from __future__ import annotations

import sys
import time
from collections import Counter


class OneProcess:
    rank = dp_rank = 0
    world_size = dp_size = 1
    is_main = True

    def barrier(self) -> None:
        pass


def rows_of(i: int) -> tuple[list[dict], Counter]:
    kept = [{"prompt": f"q{i}", "response": f"r{i}.{k} " + "x" * 3000, "answer": str(i)} for k in range(i % 3)]
    return kept, Counter({"wrong answer": 4 - len(kept)})


def run(out: str, prompts: int, per_batch: int, delay: float) -> None:
    from r1cli.sample.store import ResumableOutput

    store = ResumableOutput(out, OneProcess())
    with store:
        for batch in store.pending(prompts, per_batch):
            for i in batch:
                time.sleep(delay)
                kept, rejected = rows_of(i)
                store.add(i, "arithmetic", kept, 4, rejected)
            store.batch_done()
    store.finish("driver")


if __name__ == "__main__":
    out, prompts, per_batch, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    run(out, prompts, per_batch, delay)
