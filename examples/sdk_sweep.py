"""An SDK sweep: the guide's Python example as a runnable script, offline.

    python examples/sdk_sweep.py [--steps N] [--seed S]

A toy "agent" tunes the learning rate and width in ``train.py`` (held in
memory), "evaluates" each edit with a deterministic stand-in for validation
loss, and logs every experiment with the SDK: kept experiments chain, failed
ones are logged as failed, and the next experiment branches from the best step
with ``parent_step``. Nothing touches the network; each ``log_step`` is durable
when it returns. Set ``WECO_OBSERVE_DIR`` to keep the run out of your journal.
"""

from __future__ import annotations

import argparse
import math
import random

from weco_observe import WecoObserver

TRAIN = """LEARNING_RATE = {lr}
WIDTH = {width}


def train():
    return LEARNING_RATE, WIDTH
"""


def evaluate(lr: float, width: int) -> float | None:
    """Validation loss of a configuration; None when it 'runs out of memory'."""
    if width > 2048:
        return None
    return round(2.0 + (math.log10(lr) + 2.5) ** 2 / 4 + 256 / width / 10, 4)


def main(steps: int = 12, seed: int = 0) -> str:
    rng = random.Random(seed)
    best = {"lr": 1e-1, "width": 256}
    best_loss = evaluate(**best)
    with WecoObserver() as obs:
        run = obs.create_run(
            name="sdk sweep",
            source_code={"train.py": TRAIN.format(**best)},
            primary_metric="val_bpb",
            maximize=False,
            metadata={"seed": seed},
        )
        run.log_step(0, description="baseline", metrics={"val_bpb": best_loss}, code={"train.py": TRAIN.format(**best)})
        best_step = 0
        for step in range(1, steps + 1):
            trial = dict(best)
            if rng.random() < 0.5:
                trial["lr"] = round(best["lr"] * rng.choice([0.3, 0.5, 2.0]), 6)
                change = f"lr -> {trial['lr']}"
            else:
                trial["width"] = best["width"] * rng.choice([2, 4])
                change = f"width -> {trial['width']}"
            loss = evaluate(**trial)
            kept = loss is not None and loss < best_loss
            run.log_step(
                step,
                status="completed" if loss is not None else "failed",
                description=change + ("" if kept else " (discarded)"),
                metrics={"val_bpb": loss if loss is not None else 0.0, "width": trial["width"]},
                code={"train.py": TRAIN.format(**trial)},
                parent_step=best_step,  # every trial starts from the best code so far
            )
            if kept:
                best, best_loss, best_step = trial, loss, step
        print(f"run {run.run_id}: best step {best_step}, val_bpb {best_loss} ({best})")
    return run.run_id


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.seed)
