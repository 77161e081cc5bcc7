"""`style-aligned batch`: the sets of a manifest, in this process or on a Ray cluster, resumable."""

import argparse
import sys
from pathlib import Path
from typing import Any

from style_aligned.cli.options import DTYPES
from style_aligned.extras import require


class BatchBar:
    """A progress bar over sets on standard error, with the counts, and a line per event."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, desc="sets", unit="set", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, progress: Any) -> None:
        self._bar.total = progress.total
        if progress.message:
            self._bar.write(progress.message, file=sys.stderr)
        counts = (progress.done, progress.skipped, progress.failed, progress.running)
        self._bar.set_postfix_str("done {}, skipped {}, failed {}, running {}".format(*counts))
        self._bar.update(progress.done + progress.skipped + progress.failed - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def run_batch_command(args: argparse.Namespace) -> None:
    from style_aligned.batch import read_manifest, run_batch
    from style_aligned.batch.executors import Executor, InProcess, RayActors
    from style_aligned.batch.worker import SetWorker

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.max_retries < 0:
        raise ValueError(f"--max-retries must be at least 0, got {args.max_retries}")
    entries = read_manifest(args.manifest, model=args.model.absolute() if args.model else None)
    options = {"device": args.device, "dtype": args.dtype, "cache_dir": args.cache_dir}
    on_ray = args.workers is not None or args.ray_address is not None
    if on_ray:  # before `run_batch` makes the output folder (RayActors checks again for callers of the library)
        require("ray", extra="batch", feature="--workers and --ray-address (Ray)")

    def executor() -> Executor:
        if on_ray:
            return RayActors(workers=args.workers, address=args.ray_address, options=options)
        return InProcess(SetWorker(**options))

    bar = BatchBar()
    try:
        summary = run_batch(entries, args.out, executor=executor, max_retries=args.max_retries, progress=bar)
    finally:
        bar.close()
    print("\n".join(summary.lines()))
    if summary.failed:
        raise SystemExit(1)


def add_batch_command(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Make the sets of a manifest (JSON Lines, one set a line: see docs/batch.md) into OUT/ID folders, one after"
        " another in this process, or on Ray workers that each load the model once (--workers, --ray-address)."
        " A rerun skips the sets already complete. Exit status 1 if a set failed, 2 if the manifest is bad."
    )
    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="the sets, one JSON object a line")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="each set goes to DIR/ID")
    group = parser.add_argument_group("model")
    group.add_argument("--model", type=Path, metavar="DIR", help="the model of the lines that name none")
    group.add_argument("--cache-dir", type=Path, help="keep the conversion of a diffusers folder here")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on GPU, float32 on CPU")
    group = parser.add_argument_group("workers")
    group.add_argument("--workers", type=int, metavar="N", help="start a local Ray cluster of N workers")
    group.add_argument("--ray-address", metavar="ADDRESS", help="join a running Ray cluster (e.g. auto, HOST:6379)")
    group.add_argument("--max-retries", type=int, default=1, metavar="R", help="retries of a failed set (default: 1)")
    parser.set_defaults(command=run_batch_command)
