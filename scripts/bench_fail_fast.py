"""How fast a bad option fails: `style-aligned generate --size 1000x33`, against importing the command alone.

Each is run as a fresh process (what a user waits for), 5 times; the medians are printed with their ratio.

    python scripts/bench_fail_fast.py
"""

import statistics
import subprocess
import sys
import tempfile
import time

COMMAND = "from style_aligned.cli import main; main(['generate', '--size', '1000x33', '--prompt', 'a', '--out', {!r}])"


def seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        failing = statistics.median(seconds(COMMAND.format(f"{folder}/set")) for _ in range(5))
        imports = statistics.median(seconds("import style_aligned.cli") for _ in range(5))
    print(f"generate --size 1000x33, whole process: {failing:.2f} s (goal < 2 s)")
    print(f"import style_aligned.cli alone: {imports:.2f} s; ratio {failing / imports:.2f}")


if __name__ == "__main__":
    main()
