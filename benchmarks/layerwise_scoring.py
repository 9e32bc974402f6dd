"""Peak memory of layer-by-layer scoring against the whole-model pass, on SmolLM2 and a larger synthetic checkpoint.

Each arm runs in a subprocess of its own and reports its peak resident set size (`VmHWM`), its wall time and its
scores: `inmemory` loads the checkpoint with `from_pretrained` and runs `score_layers`; `layerwise` runs
`score_layers_layerwise` on the folder (one layer's weights in memory at a time); `floor` only imports torch,
transformers and hf_collapse (what any arm pays before it reads a weight). The issue's target for the layerwise arm is
a peak of at most one layer's weights + the calibration hidden states (float32) + 1 GiB; the table gives each peak as
a ratio of that bound (<= 1 meets it), the two arms' ratio, and the largest relative difference of their scores.

Cases: SmolLM2-135M-Instruct (the offline asset, float32) and a synthetic Llama of TinyLlama-1.1B's shape in bfloat16,
random weights written shard by shard (0.5 GB shards, as the Hub does; about 2.2 GB on disk, deleted afterwards). The
calibration rows are random token ids (the memory does not depend on the text).

    python -m benchmarks.layerwise_scoring            # both cases, about 5 min on 2 CPU cores; replaces the section
    python -m benchmarks.layerwise_scoring --quick    # a tiny synthetic checkpoint: checks the machinery (tests)

Results go to `benchmarks/records/layerwise_scoring/results.json` (`outputs/benchmarks/layerwise_scoring-quick` with
--quick); the full run also replaces its section of `benchmarks/RESULTS.md` (between the layerwise-scoring markers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.outputs import default_output
from benchmarks.sections import OWNED_SECTIONS, RESULTS_MD, publish_section

SECTION_BEGIN, SECTION_END = next(pair for pair in OWNED_SECTIONS if pair[0].startswith("<!-- layerwise-scoring:"))
ROOT = Path(__file__).resolve().parents[1]  # the arms run `-m benchmarks.layerwise_scoring` from here
GIB = 1024**3
# TinyLlama-1.1B's shape: 22 layers of width 2048, grouped-query attention (4 key/value heads), a 32k vocabulary
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
QUICK_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=500, max_position_embeddings=64)  # fmt: skip


def write_synthetic(folder: Path, shape: dict, shard_bytes: int) -> Path:
    """A random bfloat16 Llama checkpoint written shard by shard (never the whole model in memory), with its index."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, dtype="bfloat16", tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    folder.mkdir(parents=True)
    plan, size = [[]], 0  # shards as lists of (name, shape), planned from the shapes so each is written as it is made
    for name, parameter in skeleton.named_parameters():
        if size >= shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, parameter.shape))
        size += parameter.numel() * 2
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for number, entries in enumerate(plan, start=1):
        shard = {
            name: torch.ones(shape, dtype=torch.bfloat16) if name.endswith("norm.weight")
            else (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            for name, shape in entries
        }
        file = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * 2 for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(folder)
    return folder


def run_arm(arm: str, model: Path, rows: int, length: int, method: str) -> dict:
    """One arm in this process (called in a subprocess): its peak RSS, wall time and scores."""
    import torch

    import hf_collapse  # noqa: F401  (the floor counts the library's imports too)

    result = {}
    if arm != "floor":
        from transformers import AutoConfig, AutoModelForCausalLM

        from hf_collapse.layerwise import score_layers_layerwise
        from hf_collapse.scoring import score_layers

        vocab = AutoConfig.from_pretrained(model).vocab_size
        generator = torch.Generator().manual_seed(0)
        data = [{"input_ids": torch.randint(3, vocab, (length,), generator=generator).tolist()} for _ in range(rows)]
        start = time.perf_counter()
        if arm == "inmemory":
            loaded = AutoModelForCausalLM.from_pretrained(model).eval()
            scores = score_layers(loaded, data, method=method, batch_size=4, progress=False)
        else:
            scores = score_layers_layerwise(model, data, method=method, batch_size=4, progress=False)
        result = {"seconds": time.perf_counter() - start, "scores": list(scores.values)}
    return {"peak_rss": peak_rss(), **result}


def peak_rss() -> int:
    """This process's peak resident set size in bytes: `VmHWM`, which starts afresh at exec (unlike `ru_maxrss`,
    which a child inherits from the process that forked it)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(arm: str, model: Path, rows: int, length: int, method: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.layerwise_scoring", "--arm", arm, "--model", str(model),
               "--rows", str(rows), "--length", str(length), "--method", method]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {arm} arm failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bound(model: Path, rows: int, length: int) -> dict:
    """The target's terms: one layer's weights (as stored), the calibration hidden states (float32), 1 GiB."""
    from safetensors import safe_open

    index = model / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    layer, total = 0, 0
    for file in files:
        with safe_open(model / file, framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                nbytes = count * {"F32": 4, "BF16": 2, "F16": 2}.get(piece.get_dtype(), 4)
                total += nbytes
                layer += nbytes if ".layers.0." in name else 0
    hidden = rows * length * json.loads((model / "config.json").read_text())["hidden_size"] * 4
    return {"layer_bytes": layer, "hidden_bytes": hidden, "model_bytes": total, "bound": layer + hidden + GIB}


def run_case(name: str, model: Path, rows: int, length: int, method: str) -> dict:
    case = {"rows": rows, "length": length, "method": method, **bound(model, rows, length)}
    for arm in ("floor", "inmemory", "layerwise"):
        case[arm] = measure(arm, model, rows, length, method)
        print(f"{name} {arm}: peak {case[arm]['peak_rss'] / GIB:.2f} GiB", flush=True)
    whole, layer_by_layer = case["inmemory"]["scores"], case["layerwise"]["scores"]
    case["max_relative_difference"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(whole, layer_by_layer))
    return case


def section(results: dict, notes: str) -> str:
    lines = [
        SECTION_BEGIN,
        "## Layer-by-layer scoring: peak memory (issue 22)",
        "",
        f"`python -m benchmarks.layerwise_scoring`; {notes}. Peak resident memory (`VmHWM`) of one subprocess "
        "per arm. Bound = one layer's weights + the calibration hidden states (float32) + 1 GiB, the issue's target "
        "for the layerwise arm; the floor is a process that only imports torch, transformers and hf_collapse.",
        "",
        "| checkpoint | on disk | bound | floor | in memory (× bound) | layerwise (× bound) | layerwise / in memory "
        "| seconds in memory / layerwise | max relative score difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, case in results.items():
        peak = {arm: case[arm]["peak_rss"] for arm in ("floor", "inmemory", "layerwise")}
        lines.append(
            f"| {name} ({case['rows']} rows × {case['length']} tokens, {case['method']}) | "
            f"{case['model_bytes'] / GIB:.2f} GiB | {case['bound'] / GIB:.2f} GiB | {peak['floor'] / GIB:.2f} GiB | "
            f"{peak['inmemory'] / GIB:.2f} GiB ({peak['inmemory'] / case['bound']:.2f}) | "
            f"{peak['layerwise'] / GIB:.2f} GiB ({peak['layerwise'] / case['bound']:.2f}) | "
            f"{peak['layerwise'] / peak['inmemory']:.2f} | "
            f"{case['inmemory']['seconds']:.0f} / {case['layerwise']['seconds']:.0f} | "
            f"{case['max_relative_difference']:.1e} |"
        )
    return "\n".join([*lines, SECTION_END, ""])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layerwise_scoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny synthetic checkpoint: checks the machinery only")
    parser.add_argument("--output", type=Path, help="result folder (default benchmarks/records/layerwise_scoring; outputs/benchmarks/layerwise_scoring-quick with --quick)")
    parser.add_argument("--results", type=Path, help=f"markdown file whose section is replaced (default {RESULTS_MD}; none with --quick)")
    parser.add_argument("--arm", choices=["floor", "inmemory", "layerwise"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="msw", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.model, args.rows, args.length, args.method)))
        return 0
    out = args.output or default_output("layerwise_scoring", args.quick)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="layerwise-scoring-") as scratch:
        if args.quick:
            cases = [("synthetic tiny Llama, bf16", lambda: write_synthetic(Path(scratch) / "tiny", QUICK_SHAPE, 200_000), 2, 16)]
        else:
            from hf_collapse.assets import smollm2_path

            cases = [
                ("SmolLM2-135M, float32", smollm2_path, 8, 128),
                ("synthetic Llama 1.1B shape, bf16", lambda: write_synthetic(Path(scratch) / "llama-1b", LLAMA_1B, GIB // 2), 8, 128),
            ]
        for name, make, rows, length in cases:
            if name not in results:
                model = Path(make())
                results[name] = run_case(name, model, rows, length, "msw")
                if str(model).startswith(scratch):
                    shutil.rmtree(model)  # the synthetic checkpoint goes as soon as it is measured
                path.write_text(json.dumps(results, indent=1))
    text = section(results, "2 shared CPU cores, so the seconds are indicative" + (" (QUICK smoke run)" if args.quick else ""))
    publish_section(text, out, args.results, args.quick, SECTION_BEGIN, SECTION_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
