"""Regenerate the example model card in this folder from the quickstart's export. Never edit the copy by hand.

    make demo                                   # writes outputs/quickstart/model
    python model_cards/examples/regenerate.py   # copies its card and plot to model_cards/examples/quickstart/
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from huggingface_hub import ModelCard

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FILES = ("README.md", "layer_scores.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", nargs="?", default=ROOT / "outputs" / "quickstart" / "model", type=Path,
                        help="The quickstart's export folder (default: outputs/quickstart/model).")
    parser.add_argument("--to", default=HERE / "quickstart", type=Path, help="Where the example goes.")
    args = parser.parse_args(argv)
    missing = [name for name in FILES if not (args.export / name).is_file()]
    if missing:
        print(f"{args.export} has no {', '.join(missing)}: run `make demo` first", file=sys.stderr)
        return 2
    if "hf-collapse" not in (ModelCard.load(args.export / "README.md").data.tags or []):
        print(f"{args.export / 'README.md'} is not an hf-collapse card", file=sys.stderr)
        return 2
    args.to.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(args.export / name, args.to / name)
    print(f"wrote {', '.join(str(args.to / n) for n in FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
