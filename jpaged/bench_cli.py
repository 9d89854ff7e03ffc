"""`jpaged bench latency|throughput|prefix [flags]`: runs one of the end-to-end benchmarks in bench/.

Each benchmark prints a table and writes its JSON (bench/results/<name>_<device>.json unless --out
is given); `jpaged bench <name> --help` lists its flags (--model, --out and the workload sizes).
The benchmarks live in the repository's bench/ directory, so run this from a checkout.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

BENCHMARKS = {
    "latency": "batch-1 decode tok/s against the bandwidth floor (MBU), host overhead, --profile split",
    "throughput": "offline output/total tok/s: 1000 x 512/256 and nano-vllm's workload",
    "prefix": "shared-prefix workload: mean TTFT and total time, prefix caching on and off",
}
USAGE = "usage: jpaged bench {" + ",".join(BENCHMARKS) + "} [flags]\n" + "".join(
    f"  {name:<11} {text}\n" for name, text in BENCHMARKS.items())


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches to bench.<name>.main(rest); 0 on success, 1 on a bad value, 2 on bad usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"jpaged bench: error: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        print(f"jpaged bench: error: cannot import bench.{name} ({e}); run from a jpaged checkout "
              "with the repository root on PYTHONPATH", file=sys.stderr)
        return 1
    try:
        module.main(rest)
    except SystemExit as e:  # argparse: --help (0) or bad flags (2)
        return e.code if isinstance(e.code, int) else 2
    except ValueError as e:
        print(f"jpaged bench {name}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
