"""Runs one contender on one workload in this process and prints its figures as JSON.

`run.py` starts one worker per (contender, workload, repetition), so that peak RSS, the
allocator setting and Keras's backend choice belong to one contender alone.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contender", required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--epochs", type=int, required=True, help="1 warm-up + measured")
    parser.add_argument("--workdir", required=True, help="scratch dir for checkpoints")
    parser.add_argument("--track-rss", action="store_true",
                        help="record the resident set size at each epoch's end")
    args = parser.parse_args(argv)

    from benchmarks.contenders import CONTENDERS

    spec = CONTENDERS[args.contender]
    spec.prepare()  # e.g. the allocator tuning, which must run before JAX's backend starts

    from benchmarks.measure import Clock
    from benchmarks.workloads import workload

    w = workload(args.workload)
    clock = Clock(track_rss=args.track_rss)
    extra = spec.run(w, args.epochs, clock, args.workdir)
    result = clock.result(w.batches, w.batch_size, **extra)
    result.update(contender=args.contender, workload=args.workload)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
