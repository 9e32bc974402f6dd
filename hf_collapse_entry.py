"""The `hf-collapse` console script: the command line is parsed here, outside the package, so that `--help`, a
usage error or a misspelt verb answers without importing torch, transformers or peft (several seconds); the
package is imported once a verb runs (`hf_collapse.cli.run`). See `hf_collapse.cli` for the verbs."""

from __future__ import annotations

import argparse

__all__ = ["main", "make_parser"]


def _recipe_verb(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("recipe", help=help_text)
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="Recipe fields as --field value; they override the file."
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-collapse",
        description="LaCoOT layer collapse for Hugging Face Transformers: train with a Max-Sliced Wasserstein "
        "penalty, then delete the layers that collapsed.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser("train", help="Fine-tune with the MSW penalty; collapse, evaluate and export if the recipe asks.")
    _recipe_verb(train, "Recipe YAML file (keys: RecipeArguments and CollapseConfig fields).")

    validate = verbs.add_parser("validate", help="Check a recipe (keys, types, ranges, model and data names) without running it.")
    _recipe_verb(validate, "Recipe YAML file.")

    score = verbs.add_parser("score", help="Score every layer of the recipe's model on its calibration data.")
    _recipe_verb(score, "Recipe YAML file (model_name_or_path may point to a fine-tuned checkpoint).")

    collapse = verbs.add_parser(
        "collapse",
        help="Remove layers from a checkpoint (no training) and export the result.",
        epilog="Any recipe field may follow as --field value (e.g. --max_eval_samples 500).",
    )
    collapse.add_argument("src", help="Source checkpoint: local folder, Hub id or offline:... alias. Never modified.")
    collapse.add_argument("out", help="Output folder of its own (must be empty or absent unless --overwrite).")
    how = collapse.add_mutually_exclusive_group(required=True)
    how.add_argument("--layers", help="Comma-separated 0-based layers to remove, e.g. 1,2.")
    how.add_argument("--num-layers", type=int, help="Remove this many layers, chosen by score and validation metric.")
    how.add_argument("--tolerance", type=float, help="Remove layers while the metric drops by at most this much.")
    collapse.add_argument("--data", help="Calibration/validation data: a Hub dataset id, offline:..., or local files (comma-separated).")
    collapse.add_argument("--recipe", help="Recipe YAML whose data and task settings to use.")
    collapse.add_argument("--task", help="Task, when no recipe gives it (text-classification, causal-lm, image-classification).")
    collapse.add_argument("--method", help="Layer score: msw, block_influence or angular.")
    collapse.add_argument(
        "--layerwise", action="store_true",
        help="Score SRC's layers one at a time from its safetensors shards (one layer's weights in memory).",
    )
    collapse.add_argument(
        "--repair", help="Repair the cut on the --data calibration rows, folded into the weights: none, scale, linear or transport.",
    )
    collapse.add_argument(
        "--repair-data", help="causal-lm: fit the --repair on rows half from this dataset's text (a Hub id or offline:...) "
        "and half from --data's (recipe fields repair_dataset_name, repair_mix).",
    )
    collapse.add_argument("--overwrite", action="store_true", help="Replace OUT when it holds a previous hf-collapse export.")
    collapse.add_argument(
        "--stream", action="store_true",
        help="With --layers and no data: rewrite a local safetensors checkpoint tensor by tensor instead of loading it "
        "(memory: about one tensor); a source it cannot rewrite exactly is collapsed in memory, and the report says so.",
    )
    collapse.add_argument(
        "--trust-remote-code", action="store_true",
        help="Load a SRC that needs its own Python code (auto_map), running that code; only for code you have read.",
    )

    evaluate = verbs.add_parser("evaluate", help="Task metric, perplexity and latency of the recipe's model.")
    evaluate.add_argument("recipe", help="Recipe YAML file giving the model, task and evaluation data.")
    evaluate.add_argument("--compare", help="A second model (e.g. the collapsed export) to compare with, latency interleaved.")
    evaluate.add_argument("--lm-eval-tasks", help="Also run these lm-evaluation-harness tasks (comma-separated, e.g. "
                          "hellaswag,arc_easy) on both models; with --compare on an export, the results go into its card.")
    evaluate.add_argument("--lm-eval-include", help="Folder of extra lm-eval task YAML files (e.g. a local perplexity task).")
    evaluate.add_argument("--lm-eval-limit", type=float, help="Evaluate at most this many documents per task (a quick check).")
    evaluate.add_argument("--lm-eval-fewshot", type=int, help="Few-shot examples per prompt (default: each task's own).")

    push = verbs.add_parser("push", help="Upload an export folder to the Hub in one commit.")
    push.add_argument("out", help="The export folder.")
    push.add_argument("--repo-id", required=True, help="NAMESPACE/NAME of the Hub model repo (created if needed).")
    push.add_argument("--private", action="store_true", help="Create the repo as private.")
    push.add_argument("--revision", help="Branch to commit to (created if needed).")
    push.add_argument("--dry-run", action="store_true", help="List what would be uploaded; contact nothing.")
    push.add_argument("--exclude-unknown", action="store_true",
                      help="Leave out files the export did not write (otherwise such a file stops the push).")

    recipes = verbs.add_parser(
        "recipes", help="List the recipes shipped with hf-collapse (one name a line), or copy one to edit.",
        epilog="Example: hf-collapse recipes quickstart my_run.yaml && hf-collapse train my_run.yaml",
    )
    recipes.add_argument("name", nargs="?", help="Recipe to copy (a name from the list, with or without .yaml).")
    recipes.add_argument("path", nargs="?", help="Where to copy it (a file, or an existing folder).")

    gguf_meta = verbs.add_parser(
        "gguf-metadata", help="Write the per-layer metadata llama.cpp's converter leaves out (e.g. Gemma-3's window "
        "pattern) into a GGUF converted from an export, and fold a collapsed Gemma 27B's query scale into its weights.",
        epilog="Example: python convert_hf_to_gguf.py OUT --outfile m.gguf && hf-collapse gguf-metadata m.gguf --from OUT",
    )
    gguf_meta.add_argument("file", help="The GGUF file llama.cpp's convert_hf_to_gguf.py wrote from the export.")
    gguf_meta.add_argument("--from", dest="export", required=True, help="The export folder FILE was converted from.")
    where = gguf_meta.add_mutually_exclusive_group()
    where.add_argument("--output", help="The new file (default: FILE's name ending -layers.gguf, beside it); must not exist.")
    where.add_argument("--in-place", action="store_true", help="Replace FILE itself (atomically) instead of writing a new file.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    # Recipe fields (--field value) may follow any verb's own options; they are checked by the recipe parser.
    args, extra = parser.parse_known_args(argv)
    if args.verb in ("push", "recipes", "gguf-metadata") and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    from hf_collapse.cli import run  # the package, with torch, only now that a verb runs

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
