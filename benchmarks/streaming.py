"""The streamed collapse side by side with mergekit's passthrough and with the in-memory path (issue 22, part 3).

One job per model: remove a contiguous block of a quarter of the layers, ending before the last layer (the usual
depth-pruning cut), written as a folder that loads with `from_pretrained`. Three ways to do it:

- `mergekit`: `mergekit-yaml` with a passthrough merge of two slices (the layers before and after the block), the
  source's dtype, shards of the source's largest shard size;
- `stream`: `hf-collapse collapse SRC OUT --layers ... --stream` (tensor by tensor, see `hf_collapse.streaming`);
- `in-memory`: `hf-collapse collapse SRC OUT --layers ...` (the model loaded with `from_pretrained`); not run where
  the model does not fit (see `--in-memory-limit`).

Each run is a child process: wall time (median of runs interleaved across the arms, the order rotated each round)
and peak resident memory (`ru_maxrss` of that child, from `os.wait4`). The written tensors are compared with
mergekit's, name by name and byte by byte (per-tensor SHA-256, so only the source and one output are on disk at a
time). A second part shows what each tool writes for a model with per-layer `layer_types` (a tiny Gemma-3): the
config's layer count against the length of `layer_types`, and whether it loads.

Models: `tiny` (a small synthetic bf16 Llama, for --quick), `smollm2` (the offline SmolLM2-135M asset, float32),
`1b` (synthetic bf16, Llama-3.2-1B shape, 0.5 GB shards) and `8b` (synthetic bf16, Llama-3-8B shape, 5 GB shards
as the Hub has them; ~16 GB, written in chunks, deleted afterwards unless --keep).

    python -m benchmarks.streaming --quick                  # seconds: the machinery on the tiny model (a test runs it)
    python -m benchmarks.streaming --sizes smollm2,1b       # some minutes
    python -m benchmarks.streaming --sizes 8b --repeats 2   # ~16 GB of disk for the source, ~12 GB for one output

mergekit is looked for as `mergekit-yaml` on PATH, else in /work/venvs/mergekit (see `--mergekit`). Results go to
`benchmarks/records/streaming/results.json` (`outputs/benchmarks/streaming-quick` with --quick; merged with the sizes
already there); a run without --quick also replaces the streaming section of `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.outputs import default_output, default_work
from benchmarks.sections import OWNED_SECTIONS, RESULTS_MD, publish_section

SECTION_BEGIN, SECTION_END = next(pair for pair in OWNED_SECTIONS if pair[0].startswith("<!-- streaming:"))
GIB = 1 << 30
ARMS = ("mergekit", "stream", "in-memory")
# Synthetic Llama shapes: config fields, and the shard size of the checkpoint in bytes (as save_pretrained counts).
SYNTHETIC = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True), 100_000),
    "1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True), 500_000_000),
    "8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), 5_000_000_000),
}
_DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4}
PROBE_LIMIT_GIB = 1  # hf_collapse.streaming.PROBE_LIMIT (not imported: the parent process stays light)


# ---- sources ----------------------------------------------------------------------------------------------------


def synthetic_checkpoint(folder: Path, name: str, seed: int = 0) -> Path:
    """A bf16 Llama checkpoint of the named shape with random weights (N(0, 0.02), norms 1), written tensor by
    tensor in chunks (the generator holds one chunk, never the model), sharded as save_pretrained shards."""
    import torch
    import transformers

    fields, shard_size = SYNTHETIC[name]
    config = transformers.LlamaConfig(**fields, max_position_embeddings=4096, dtype="bfloat16",
                                      architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2)
    if (folder / "config.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.tie_weights()
    seen, tensors = set(), []
    for key, parameter in model.named_parameters():  # tied weights once, under their first name
        if id(parameter) not in seen:
            seen.add(id(parameter))
            tensors.append((key, tuple(parameter.shape)))
    shards, filled = [[]], 0
    for key, shape in tensors:
        size = 2 * _count(shape)
        if shards[-1] and filled + size > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append((key, shape))
        filled += size
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for number, names in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        _write_random_shard(partial / file, names, generator)
        weight_map.update({key: file for key, _ in names})
    if len(shards) > 1:
        total = sum(2 * _count(shape) for _, shape in tensors)
        (partial / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(partial)
    os.rename(partial, folder)
    return folder


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _write_random_shard(path: Path, names: list, generator) -> None:
    import torch

    header, offset = {}, 0
    for key, shape in names:
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * _count(shape)]}
        offset += 2 * _count(shape)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    chunk = 1 << 25  # values generated at a time
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for key, shape in names:
            left = _count(shape)
            while left:
                n = min(left, chunk)
                if key.endswith("norm.weight"):
                    values = torch.ones(n, dtype=torch.bfloat16)
                else:
                    values = (torch.randn(n, generator=generator) * 0.02).to(torch.bfloat16)
                out.write(values.view(torch.uint8).numpy().tobytes())
                left -= n


def source_folder(name: str, work: Path) -> Path:
    if name == "smollm2":
        from hf_collapse import assets

        return assets.smollm2_path()
    return synthetic_checkpoint(work / f"synthetic-{name}", name)


def _shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _header(file: Path) -> tuple[dict, int]:
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length)), 8 + length


def tensor_hashes(folder: Path) -> dict[str, list]:
    """Every tensor of a safetensors folder: [dtype, shape, SHA-256 of its bytes]."""
    found = {}
    for file in _shard_files(folder):
        header, start = _header(file)
        with file.open("rb") as handle:
            for key, entry in sorted(header.items(), key=lambda item: item[1].get("data_offsets", [0])[0] if item[0] != "__metadata__" else -1):
                if key == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                handle.seek(start + begin)
                digest, left = hashlib.sha256(), end - begin
                while left:
                    block = handle.read(min(left, 64 << 20))
                    digest.update(block)
                    left -= len(block)
                found[key] = [entry["dtype"], entry["shape"], digest.hexdigest()]
    return found


# ---- the job ----------------------------------------------------------------------------------------------------


def removed_block(count: int) -> list[int]:
    """A quarter of the layers (at least one), ending just before the last layer."""
    size = max(1, count // 4)
    return list(range(count - 1 - size, count - 1))


def mergekit_config(source: Path, count: int, removed: list[int], dtype: str) -> str:
    slices = [(0, removed[0]), (removed[-1] + 1, count)]
    lines = ["slices:"]
    for start, end in slices:
        lines += ["  - sources:", f"      - model: {source}", f"        layer_range: [{start}, {end}]"]
    return "\n".join(lines + ["merge_method: passthrough", f"dtype: {dtype}", ""])


def commands(arm: str, source: Path, out: Path, removed: list[int], work: Path, mergekit: str, info: dict) -> list[str]:
    layers = ",".join(map(str, removed))
    if arm == "mergekit":
        recipe = work / "mergekit.yml"
        recipe.write_text(mergekit_config(source, info["layers"], removed, info["dtype"]))
        shard = info["largest_shard"] // _DTYPE_SIZES[info["dtype_code"]] if info["sharded"] else 10**12
        command = [mergekit, str(recipe), str(out), "--out-shard-size", str(shard)]
        return command + ([] if info["tokenizer"] else ["--no-copy-tokenizer"])
    command = [sys.executable, "-m", "hf_collapse.cli", "collapse", str(source), str(out), "--layers", layers]
    return command + (["--stream"] if arm == "stream" else [])


def settle() -> str:
    """Flush the previous run's writes and, where this process may, empty the page cache, so each run starts alike
    (a run would otherwise pay for the last one's writeback, or read a source the last one left cached)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return "synced before each run (the page cache could not be emptied here: warm reads)"
    return "synced and the page cache emptied before each run (every run reads its source cold from disk)"


def run_child(command: list[str], log: Path) -> tuple[float, int, int]:
    """Run `command` to completion: (wall seconds, peak RSS in bytes, exit status)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with log.open("ab") as sink:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=sink, stderr=sink, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, child.returncode


def source_info(source: Path) -> dict:
    config = json.loads((source / "config.json").read_text())
    files = _shard_files(source)
    sizes = [f.stat().st_size for f in files]
    headers = [_header(f)[0] for f in files]
    dtype_code = next(e["dtype"] for h in headers for k, e in h.items() if k != "__metadata__")
    return {
        "layers": config["num_hidden_layers"], "dtype": config.get("dtype") or config.get("torch_dtype") or "float32",
        "dtype_code": dtype_code, "size": sum(sizes), "largest_shard": max(sizes), "shards": len(files),
        "sharded": (source / "model.safetensors.index.json").is_file(),
        "tokenizer": (source / "tokenizer.json").is_file() or (source / "tokenizer_config.json").is_file(),
        "parameters": sum(_count(e["shape"]) for h in headers for k, e in h.items() if k != "__metadata__"),
    }


def measure_model(name: str, work: Path, mergekit: str | None, arms: list[str], repeats: int, in_memory_limit: float) -> dict:
    """Run each arm `repeats` times on the model, interleaved; the first arm's tensors are the reference."""
    source = source_folder(name, work)
    info = source_info(source)
    removed = removed_block(info["layers"])
    wanted = arms
    arms = [a for a in arms if a != "in-memory" or info["size"] <= in_memory_limit * GIB]
    result = {"source": info, "removed": removed, "repeats": repeats, "reference": arms[0],
              "load_average": round(os.getloadavg()[0], 1),
              "arms": {a: {"wall": [], "rss": []} for a in arms}}
    if "in-memory" in wanted and "in-memory" not in arms:
        result["in_memory_skipped"] = f"the model ({info['size'] / GIB:.1f} GiB) is above --in-memory-limit {in_memory_limit:g} GiB"
    reference = None
    out = work / f"out-{name}"
    for round_ in range(repeats):
        order = arms[round_ % len(arms):] + arms[: round_ % len(arms)]
        for arm in order:
            shutil.rmtree(out, ignore_errors=True)
            result["page_cache"] = settle()
            wall, rss, code = run_child(commands(arm, source, out, removed, work, mergekit, info), work / f"{name}-{arm}.log")
            if code != 0:
                raise RuntimeError(f"{arm} failed on {name} (exit {code}): see {work / f'{name}-{arm}.log'}")
            result["arms"][arm]["wall"].append(wall)
            result["arms"][arm]["rss"].append(rss)
            if round_ == 0:  # hashed once per arm: the source and one output on disk at a time
                result["arms"][arm]["hashes"] = tensor_hashes(out)
                result["arms"][arm]["config"] = _config_summary(out)
            shutil.rmtree(out, ignore_errors=True)
    reference = result["arms"][arms[0]]["hashes"]
    for arm in arms:
        hashes = result["arms"][arm].pop("hashes")
        result["arms"][arm]["equal_to_reference"] = hashes == reference
        result["arms"][arm]["tensors"] = len(hashes)
    return result


def _config_summary(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {"num_hidden_layers": config.get("num_hidden_layers"), "layer_types": len(config.get("layer_types") or [])}


# ---- layer_types ------------------------------------------------------------------------------------------------


def layer_types_case(work: Path, mergekit: str | None, arms: list[str]) -> dict:
    """What mergekit and the streamed collapse write for a tiny Gemma-3 text model (sliding, full, sliding, full)
    with layer 1 (full attention) removed: the config's layer count, `layer_types`, and whether it loads with the
    kept layers' attention kinds."""
    import torch
    import transformers

    source = work / "gemma3-tiny"
    if not (source / "config.json").is_file():
        config = transformers.Gemma3TextConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, sliding_window_pattern=2,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        transformers.Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(source)
    original = json.loads((source / "config.json").read_text())["layer_types"]
    kept = [t for i, t in enumerate(original) if i != 1]
    info = source_info(source)
    found = {"source_layer_types": original, "removed": [1], "expected_layer_types": kept}
    for arm in [a for a in ("mergekit", "stream") if a in arms]:
        out, log = work / f"gemma3-{arm}", work / f"gemma3-{arm}.log"
        shutil.rmtree(out, ignore_errors=True)
        log.unlink(missing_ok=True)
        _, _, code = run_child(commands(arm, source, out, [1], work, mergekit, info), log)
        entry = {"exit": code}
        if code != 0:
            entry["error"] = (log.read_text(errors="replace").strip().splitlines() or ["?"])[-1].strip()[:300]
        else:
            config = json.loads((out / "config.json").read_text())
            entry.update(num_hidden_layers=config["num_hidden_layers"], layer_types=config.get("layer_types"))
            entry["loads"] = _loads(out)
            entry["consistent"] = entry["layer_types"] == kept and entry["num_hidden_layers"] == len(kept)
        found[arm] = entry
        shutil.rmtree(out, ignore_errors=True)
    return found


def _loads(folder: Path) -> str:
    code = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print([getattr(l.self_attn, 'sliding_window', None) is not None for l in m.model.layers])")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode != 0:
        return "no: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return "yes, sliding window per layer: " + done.stdout.strip().splitlines()[-1]


# ---- report -----------------------------------------------------------------------------------------------------


def section(results: dict) -> str:
    lines = [SECTION_BEGIN, "", "## Streaming collapse vs mergekit passthrough vs in-memory (issue 22)", "",
             "Written by `python -m benchmarks.streaming` (see its docstring for the protocol). The job: remove a "
             "contiguous quarter of the layers, ending before the last one. Wall time is the median of runs "
             "interleaved across the arms; peak RSS is the child process's `ru_maxrss`. Targets: streaming peak RSS ≤ "
             "largest shard + 1 GiB; streaming wall ≤ 1.1× mergekit's; tensors bitwise equal to mergekit's.", "",
             "| model | weights | largest shard | arm | runs | wall (s) | wall ratio | peak RSS (GiB) | RSS / (shard + 1 GiB) | RSS / weights | tensors = reference's |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    in_memory = [max(r["arms"]["in-memory"]["rss"]) / r["source"]["size"] for r in results.get("models", {}).values()
                 if "in-memory" in r["arms"] and r["source"]["size"] > GIB / 4]
    for name, result in results.get("models", {}).items():
        info = result["source"]
        reference = result["reference"]
        base = statistics.median(result["arms"][reference]["wall"])
        for arm in ARMS:
            if arm not in result["arms"] and "in_memory_skipped" in result and arm == "in-memory":
                lines.append(f"| {name} | {info['size'] / GIB:.2f} GiB | {info['largest_shard'] / GIB:.2f} GiB | {arm} "
                             f"| 0 | not run | | | | | |")
                ratio = max(in_memory, default=None)
                fit = "" if ratio is None else (
                    f"; at the {ratio:.2f}× the weights it peaked at above, it would need about "
                    f"{ratio * info['size'] / GIB:.0f} GiB on this {results.get('machine', '')} machine: it does not fit")
                notes.append(f"{name}, in-memory: not run: {result['in_memory_skipped']}{fit}.")
                continue
            if arm not in result["arms"]:
                continue
            data = result["arms"][arm]
            wall, rss = statistics.median(data["wall"]), max(data["rss"])
            equal = "(reference)" if arm == reference else ("yes" if data["equal_to_reference"] else "**no**")
            lines.append(
                f"| {name} | {info['size'] / GIB:.2f} GiB | {info['largest_shard'] / GIB:.2f} GiB | {arm} | "
                f"{len(data['wall'])} | {wall:.1f} | {wall / base:.2f}× ({reference}) | {rss / GIB:.2f} | "
                f"{rss / (info['largest_shard'] + GIB):.2f} | {rss / info['size']:.2f} | {equal} |")
    case = results.get("layer_types")
    if case:
        lines += ["", f"`layer_types` model (tiny Gemma-3 text, bf16, layers {case['source_layer_types']}), layer 1 "
                  f"removed; the kept layers are {case['expected_layer_types']}:", "",
                  "| arm | num_hidden_layers | layer_types written | consistent | loads |", "|---|---|---|---|---|"]
        for arm in [a for a in ("mergekit", "stream") if a in case]:
            entry = case[arm]
            if entry["exit"] != 0:
                lines.append(f"| {arm} | fails (exit {entry['exit']}): `{entry['error']}` | | no | no |")
                continue
            lines.append(f"| {arm} | {entry['num_hidden_layers']} | {entry['layer_types']} | "
                         f"{'yes' if entry['consistent'] else '**no**'} | {entry['loads']} |")
    notes.append(f"The stream arm includes its output checks: the structure check always, and up to "
                 f"{PROBE_LIMIT_GIB:g} GiB of weights the probe check, which loads the source and the output once each "
                 "(so on small models it costs more than the copy itself; mergekit checks nothing).")
    loads = {name: r.get("load_average") for name, r in results.get("models", {}).items()}
    notes.append("Load average of the machine when each model started (other jobs share it): "
                 + ", ".join(f"{name} {load}" for name, load in loads.items()) + ".")
    caches = {r.get("page_cache") for r in results.get("models", {}).values()} - {None}
    notes += [f"Page cache: {cache}." for cache in sorted(caches)]
    lines += [""] + [f"- {note}" for note in notes + results.get("notes", [])]
    lines += ["", f"Machine: {results.get('machine', '?')}. mergekit {results.get('mergekit_version', 'not run')}.", "", SECTION_END]
    return "\n".join(lines) + "\n"


def find_mergekit(given: str | None) -> str:
    for candidate in (given, shutil.which("mergekit-yaml"), "/work/venvs/mergekit/bin/mergekit-yaml"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit("mergekit-yaml not found: pip install mergekit (in a separate venv if it would change your "
                     "torch or transformers), then pass --mergekit PATH")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny synthetic model only, one round")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, the first is the reference: mergekit, stream, in-memory")
    parser.add_argument("--sizes", default="smollm2,1b,8b", help="comma-separated: tiny, smollm2, 1b, 8b")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per model")
    parser.add_argument("--in-memory-limit", type=float, default=4.0,
                        help="run the in-memory arm only on weights up to this many GiB (it needs ~2x the model)")
    parser.add_argument("--work", type=Path, help="folder for sources and outputs (default: beside --output, else outputs/benchmarks/streaming-work[-quick])")
    parser.add_argument("--output", type=Path, help="result folder (default benchmarks/records/streaming; outputs/benchmarks/streaming-quick with --quick)")
    parser.add_argument("--results", type=Path, help=f"markdown file whose section is replaced (default {RESULTS_MD}; none with --quick)")
    parser.add_argument("--mergekit", help="path of mergekit-yaml")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints (they are deleted otherwise)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    sizes = ["tiny"] if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    repeats = 1 if args.quick else args.repeats
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS):
        raise SystemExit(f"--arms takes some of {', '.join(ARMS)}; got {args.arms!r}")
    # sources and collapsed models are working files: beside a folder the caller named, else under outputs/
    work = args.work or (args.output.with_name(args.output.name + "-work") if args.output
                         else default_work("streaming", args.quick))
    output = args.output or default_output("streaming", args.quick)
    work.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    mergekit = find_mergekit(args.mergekit) if "mergekit" in arms else None
    saved = output / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {"models": {}}
    if mergekit is not None:
        version = subprocess.run([str(Path(mergekit).with_name("python")), "-c",
                                  "import importlib.metadata as m; print(m.version('mergekit'))"], capture_output=True, text=True)
        results["mergekit_version"] = version.stdout.strip() or "?"
    results["machine"] = f"{os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM"
    for name in sizes:
        print(f"{name}: measuring", flush=True)
        results["models"][name] = measure_model(name, work, mergekit, arms, repeats, args.in_memory_limit)
        if name in SYNTHETIC and not args.keep:
            shutil.rmtree(work / f"synthetic-{name}", ignore_errors=True)
        saved.write_text(json.dumps(results, indent=1))
    results["layer_types"] = layer_types_case(work, mergekit, arms)
    saved.write_text(json.dumps(results, indent=1))
    text = section(results)
    publish_section(text, None, args.results, args.quick, SECTION_BEGIN, SECTION_END)  # no section.md here
    return 0


if __name__ == "__main__":
    sys.exit(main())
