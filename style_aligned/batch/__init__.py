"""Many sets at once: a manifest of sets, made one after another in this process or on Ray actors, resumable.

- `manifest`: the JSON Lines manifest, read and checked whole (`read_manifest`, `SetEntry`).
- `worker`: what a worker does with its pipeline (`SetWorker`): whole sets, or shares of a split set.
- `executors`: where workers run: `InProcess` (no Ray) or `RayActors`.
- `runner`: the driver (`run_batch`): resuming, retries, progress, and writing each set's folder whole.

See `docs/batch.md`.
"""

from style_aligned.batch.manifest import ManifestError, SetEntry, read_manifest
from style_aligned.batch.runner import BatchProgress, BatchSummary, run_batch

__all__ = ["BatchProgress", "BatchSummary", "ManifestError", "SetEntry", "read_manifest", "run_batch"]
