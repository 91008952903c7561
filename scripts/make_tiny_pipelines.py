"""Write tiny random-weight SD3 and FLUX pipelines (real layouts and tokenizers) for tests and demos.

    python scripts/make_tiny_pipelines.py OUT_DIR [--seed S]   # -> OUT_DIR/sd3, OUT_DIR/flux (~10 s on CPU)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlgen.testing.tiny_pipelines import build_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, path in build_all(args.out_dir, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
