"""Collapse a checkpoint folder without loading the model: the weights are rewritten tensor by tensor.

`hf-collapse collapse SRC OUT --layers ... --stream` on a local safetensors checkpoint never builds the model in
memory. The layers to drop and the new config come from the same plan as the in-memory surgery
([`collapsed_config`], run on a model built on the meta device, so one rule table decides every per-layer field);
the kept layers' tensors are renamed to their new indices and their bytes copied, one tensor at a time, from the
source shards into new shards of at most the source's largest shard size, with a fresh
`model.safetensors.index.json`. Bytes are copied as they are (bf16 stays bf16, every value bitwise the same), and
each floating-point tensor is checked to be finite on the way, as the in-memory path checks the loaded weights.

Verification: a model built from the new config on the meta device must have exactly the written tensor names and
shapes (tied weights written once, as `save_pretrained` writes them), always; and when the weights are small
enough to load twice ([`PROBE_LIMIT`]), the output loaded with `from_pretrained` must give the original's outputs
with the same layers bypassed on a probe input. The report says which checks ran.

What a rewrite of names cannot do exactly is left to the in-memory path ([`stream_blocker`] says why): a Hub id,
pickled weights, a checkpoint with its own code, quantized weights, adapters, a sentence-transformers folder,
tensor names that transformers converts on loading (they are not the model's own names), and families whose exact
collapse also changes weights (GPT-2's query rescaling, T5's relative attention bias).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from .choice import LayerChoice, selection_sentence
from .errors import RecipeError
from .export import export_files
from .layers import find_layer_stacks, resolve_layer_selection
from .manifest import ManifestEntry
from .report import CollapseReport
from .sourcecheck import check_weight_files
from .surgery import collapsed_config
from .surgery.verify import build_probe, probe_differences, reference_outputs

__all__ = ["PROBE_LIMIT", "StreamPlan", "collapse_streamed", "plan_stream", "stream_blocker", "write_weights"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Weights up to this size are loaded (twice: source and output) to check the output on a probe input.
PROBE_LIMIT = 1 << 30
_CHUNK = 64 << 20  # bytes copied at a time
_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
          "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_NOT_STREAMED = {  # files whose presence means the checkpoint is more than config + safetensors weights
    "modules.json": "it is a sentence-transformers pipeline (modules.json), whose modules the in-memory export carries",
    "adapter_config.json": "it holds PEFT adapters (adapter_config.json), which must be merged first",
    "pytorch_model.bin": "its weights are pickled (pytorch_model.bin), not safetensors",
    "pytorch_model.bin.index.json": "its weights are pickled (pytorch_model.bin), not safetensors",
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: the source file, the byte range in it, its dtype and shape."""

    name: str  # in the source
    file: Path
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]


def _header(file: Path) -> tuple[dict, int]:
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length).decode("utf-8")), 8 + length


def read_entries(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors checkpoint folder (one file, or shards with an index), in file order.

    Raises:
        [`RecipeError`]: a missing, empty or truncated shard; an index that names a file or tensor that is not there, or
            misses one a shard holds.
    """
    check_weight_files(folder)  # truncated or not safetensors at all: one line, naming the file
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RecipeError(f"{index} has no weight_map: restore the checkpoint's index (nothing was written)")
        files = list(dict.fromkeys(weight_map.values()))
    else:
        weight_map, files = None, [SINGLE_FILE]
    entries: dict[str, TensorEntry] = {}
    for name in files:
        file = folder / name
        if os.path.basename(name) != name or not file.is_file():
            raise RecipeError(f"{folder} names the weights file {name!r}, which is not in the folder: restore it "
                              "(nothing was written)")
        header, offset = _header(file)
        for key, value in header.items():
            if key != "__metadata__":
                start, end = value["data_offsets"]
                entries[key] = TensorEntry(key, file, offset + start, offset + end, value["dtype"], tuple(value["shape"]))
    if weight_map is not None:
        wrong = sorted(k for k in weight_map if k not in entries or entries[k].file.name != weight_map[k])
        extra = sorted(k for k in entries if k not in weight_map)
        if wrong or extra:
            what = f"names {wrong[0]} in {weight_map[wrong[0]]}, which does not hold it" if wrong else \
                f"does not name {extra[0]}, which {entries[extra[0]].file.name} holds"
            raise RecipeError(f"{index} {what}: the index and the shards disagree; restore the checkpoint (nothing was "
                              "written)")
    return entries


def stream_blocker(folder: str | os.PathLike) -> str | None:
    """Why the checkpoint at `folder` cannot be collapsed by rewriting its files, or `None` when it can."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a local folder (a Hub id is downloaded and loaded)"
    if not (folder / "config.json").is_file():
        return "it has no config.json"
    for name, why in _NOT_STREAMED.items():
        if (folder / name).exists():
            return why
    if not (folder / INDEX_FILE).is_file() and not (folder / SINGLE_FILE).is_file():
        return f"it has neither {SINGLE_FILE} nor {INDEX_FILE}"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("auto_map"):
        return "it needs its own code (auto_map)"
    if config.get("quantization_config"):
        return "its weights are quantized (quantization_config)"
    architecture = (config.get("architectures") or [None])[0]
    if not isinstance(architecture, str) or not isinstance(getattr(transformers, architecture, None), type):
        return f"its config names no transformers class to build ({architecture!r})"
    return None


@dataclass
class StreamPlan:
    """What a streamed collapse writes: each output tensor's source, the new config, and the counts for the report.

    Attributes:
        model_class (`type`): the class the checkpoint was saved as.
        config: the collapsed config (the same one [`collapse_layers`] leaves).
        tensors (`dict[str, TensorEntry]`): the output tensor name -> where its bytes are in the source, in order.
        removed (`dict[str, tuple[int, ...]]`): removed layers per stack, in the original numbering.
        layers_before (`dict[str, int]`): each stack's count before.
        parameters_before (`int`), parameters_after (`int`): parameter counts (shared weights once).
        shard_limit (`int`): the most bytes of tensor data per output shard (the source's largest shard); 0 for one file.
        earlier_removed: the source's own `collapsed_layers` (a checkpoint collapsed before), or `None`.
    """

    model_class: type
    config: object
    tensors: dict[str, TensorEntry]
    removed: dict[str, tuple[int, ...]]
    layers_before: dict[str, int]
    parameters_before: int
    parameters_after: int
    shard_limit: int
    earlier_removed: object

    @property
    def size(self) -> int:
        return sum(entry.end - entry.start for entry in self.tensors.values())


def _meta_model(model_class: type, config) -> nn.Module:
    """The model built on the meta device (no memory), with its tied weights tied."""
    with torch.device("meta"):
        model = model_class(copy.deepcopy(config))
    model.tie_weights()
    return model


def _expected_tensors(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], list[list[str]]]:
    """Names and shapes a checkpoint of `model` holds (its state dict) and the groups of names that share a tensor."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return shapes, [g for g in groups.values() if len(g) > 1]


def structure_differences(model: nn.Module, written: dict[str, tuple[int, ...]]) -> list[str]:
    """How tensors `written` (name -> shape) differ from what a checkpoint of `model` holds: each tensor once, tied
    tensors under at least one of their names, every shape as the model's."""
    shapes, tied = _expected_tensors(model)
    differences = [f"{n} (shape {s}) is no tensor of {type(model).__name__}" for n, s in written.items() if n not in shapes]
    differences += [f"{n} has shape {s} but {type(model).__name__} has {shapes[n]}"
                    for n, s in written.items() if n in shapes and shapes[n] != s]
    shared = {name: group for group in tied for name in group}
    differences += [f"{n} (shape {s}) is missing" for n, s in shapes.items()
                    if n not in written and not any(other in written for other in shared.get(n, []))]
    return differences


def _renamed(name: str, stacks, selection: dict[str, list[int]]) -> str | None:
    """The tensor's name once the layers are removed; `None` for a tensor of a removed layer."""
    for stack in stacks:
        prefix = f"{stack.path}."
        index, dot, rest = name[len(prefix):].partition(".")
        if not name.startswith(prefix) or not index.isdigit() or not dot:
            continue
        removed = selection.get(stack.name, [])
        if int(index) in removed:
            return None
        return f"{prefix}{int(index) - sum(1 for i in removed if i < int(index))}.{rest}"
    return name


def _check_source(meta: nn.Module, entries: dict[str, TensorEntry], stacks, folder: Path) -> str | None:
    """Refuse tensors of layers the config does not declare (or layers without tensors); return why the names are
    not the model's own (a conversion on loading: the in-memory path handles it), or `None`."""
    for stack in stacks:
        prefix = f"{stack.path}."
        present = {int(n[len(prefix):].split(".")[0]) for n in entries
                   if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit()}
        declared = f"{type(stack.config).__name__}.{stack.count_attr}={len(stack)}"
        if present and max(present) >= len(stack):
            raise RecipeError(f"{folder} holds weights of layer {max(present)} of {stack.path} but its config declares "
                              f"{declared} layers: the extra layers would be silently dropped on loading; fix {stack.count_attr} in "
                              f"config.json to {max(present) + 1} (or remove those weights); nothing was written")
        missing = sorted(set(range(len(stack))) - present)
        if missing:
            raise RecipeError(f"{folder} has no weights for layer {missing[0]} of {stack.path} but its config declares "
                              f"{declared} layers: those layers would be randomly initialised on loading; fix {stack.count_attr} in "
                              "config.json to the number of layers the weights hold; nothing was written")
    differences = structure_differences(meta, {name: entry.shape for name, entry in entries.items()})
    if differences:
        return f"its tensor names are not those of {type(meta).__name__} (e.g. {differences[0]}): transformers " \
               "converts them on loading"
    return None


def plan_stream(folder: str | os.PathLike, layers) -> StreamPlan | str:
    """Plan the streamed collapse of the checkpoint at `folder`, or say why only the in-memory path can do it.

    Returns:
        [`StreamPlan`], or a `str`: the reason the weights cannot be rewritten by renaming (see the module).

    Raises:
        [`RecipeError`] / `ValueError`: bad input (a shard missing or truncated, an index naming absent tensors, a config
            whose layer count disagrees with the tensors) or a removal the surgery refuses.
    """
    folder = Path(folder)
    blocker = stream_blocker(folder)
    if blocker is not None:
        return blocker
    source_config = transformers.AutoConfig.from_pretrained(folder)
    model_class = getattr(transformers, source_config.architectures[0])
    entries = read_entries(folder)
    meta = _meta_model(model_class, source_config)
    stacks = find_layer_stacks(meta)
    why = _check_source(meta, entries, stacks, folder)
    if why is not None:
        return why
    config, removed, weight_changes = collapsed_config(meta, layers)
    if weight_changes:
        return f"its exact collapse also changes weights ({', '.join(weight_changes)})"
    selection = resolve_layer_selection(stacks, layers)
    tensors = {}
    for name, entry in entries.items():
        new = _renamed(name, stacks, selection)
        if new is not None:
            tensors[new] = entry
    sizes = {entry.file: 0 for entry in entries.values()}
    for entry in entries.values():
        sizes[entry.file] += entry.end - entry.start
    collapsed = _meta_model(model_class, config)
    return StreamPlan(
        model_class, config, tensors, removed, {stack.name: len(stack) for stack in stacks}, meta.num_parameters(),
        collapsed.num_parameters(), max(sizes.values()) if (folder / INDEX_FILE).is_file() else 0,
        copy.deepcopy(getattr(source_config, "collapsed_layers", None)),
    )


def check_room(plan: StreamPlan, out: Path) -> None:
    """Refuse before writing when the file system of `out` has less free space than the output's weights need."""
    existing = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < plan.size + (16 << 20):
        raise RecipeError(f"{existing} has {free / 2**30:.2f} GiB free but the collapsed weights need "
                          f"{plan.size / 2**30:.2f} GiB: free some space or choose another output folder (nothing was "
                          "written)")


def _shards(plan: StreamPlan) -> list[list[str]]:
    """The output tensors grouped into shards of at most `plan.shard_limit` bytes, in order (one shard if 0)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, entry in plan.tensors.items():
        size = entry.end - entry.start
        if plan.shard_limit and shards[-1] and filled + size > plan.shard_limit:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def _finite(values: torch.Tensor) -> bool:
    # the extremes propagate NaN and show infinities; aminmax reads bf16 some 50x faster than isfinite().all()
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


class _ShardWriter:
    """Writes one shard: the header, then each tensor's bytes copied in chunks from its source file, checking that
    floating-point values are finite. Three threads share the work so the disk never waits on Python: one reads the
    next chunk ahead (`os.preadv`, positional), this one checks and writes the current one, and one hashes what was
    written (SHA-256, for the manifest, so the output is never read again). Three buffers rotate: a chunk's buffer is
    refilled only once that chunk has been written and hashed."""

    def __init__(self, target, pool: ThreadPoolExecutor, hasher: ThreadPoolExecutor, buffers: list[bytearray]):
        self.target, self.pool, self.hasher, self.buffers = target, pool, hasher, buffers
        self.digest = hashlib.sha256()
        self.hashed: list[Future | None] = [None, None, None]
        self.ahead: Future | None = None

    def write(self, data) -> None:
        self.target.write(data)
        self.digest.update(data)

    def _read(self, number: int, chunk: tuple[TensorEntry, object, int, int]) -> memoryview:
        entry, source, start, length = chunk
        view = memoryview(self.buffers[number % 3])[:length]
        got = os.preadv(source.fileno(), [view], start)
        if got != length:
            raise RecipeError(f"{entry.file} ended while reading {entry.name}: the file is truncated; restore it")
        return view

    def _prefetch(self, chunks: list, number: int) -> Future | None:
        if number >= len(chunks):
            return None
        if self.hashed[number % 3] is not None:  # the buffer's last chunk: written already, its hash must be done
            self.hashed[number % 3].result()
        return self.pool.submit(self._read, number, chunks[number])

    def copy(self, chunks: list[tuple[TensorEntry, object, int, int]]) -> None:
        """Copy `chunks` ((entry, open source file, byte offset, length) in output order) to the target."""
        self.ahead = self._prefetch(chunks, 0)
        for number, (entry, _, _, _) in enumerate(chunks):
            view = self.ahead.result()
            self.ahead = self._prefetch(chunks, number + 1)
            dtype = _FLOATS.get(entry.dtype)
            if dtype is not None and not _finite(torch.frombuffer(view, dtype=dtype)):
                raise RecipeError(f"{entry.file.parent} has non-finite weights (NaN or infinity) in {entry.name}: the "
                                  "checkpoint is broken (a diverged training run, or a bad conversion); collapse a "
                                  "checkpoint with finite weights")
            self.hashed[number % 3] = self.hasher.submit(self.digest.update, view)  # in order: one hashing thread
            self.target.write(view)

    def finish(self) -> str:
        """Wait for every thread's work on this shard (a read ahead of a failed copy included); returns the hash."""
        wait([f for f in (*self.hashed, self.ahead) if f is not None])
        for future in self.hashed:
            if future is not None:
                future.result()
        return self.digest.hexdigest()


def _chunks(names: list[str], plan: StreamPlan, handles: dict[Path, object]) -> list[tuple[TensorEntry, object, int, int]]:
    chunks = []
    for name in names:
        entry = plan.tensors[name]
        if entry.file not in handles:
            handles[entry.file] = entry.file.open("rb")
        chunks += [(entry, handles[entry.file], start, min(_CHUNK, entry.end - start))
                   for start in range(entry.start, entry.end, _CHUNK)]
    return chunks


def _write_shard(path: Path, names: list[str], plan: StreamPlan, pools: tuple) -> ManifestEntry:
    """Write one shard with `pools` (the reading and the hashing thread, the three buffers); returns its size and
    SHA-256."""
    header, offset = {}, 0
    for name in names:
        entry = plan.tensors[name]
        header[name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.end - entry.start]}
        offset += entry.end - entry.start
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    handles: dict[Path, object] = {}
    try:
        with path.open("wb") as target:
            writer = _ShardWriter(target, *pools)
            writer.write(struct.pack("<Q", len(text)) + text)
            try:
                writer.copy(_chunks(names, plan, handles))
            finally:
                sha256 = writer.finish()  # no thread may still read a buffer or a handle once this returns
    finally:
        for handle in handles.values():
            handle.close()
    return ManifestEntry(path.stat().st_size, sha256)


def write_weights(plan: StreamPlan, folder: Path, digests: dict[str, ManifestEntry] | None = None) -> dict[str, tuple[int, ...]]:
    """Write the plan's tensors into `folder` (one `model.safetensors`, or shards and their index) and the config;
    returns the written tensor names and shapes. `digests`, if given, receives each weight file's size and SHA-256
    (hashed as it was written), which the export's manifest takes instead of reading the weights again."""
    shards = _shards(plan)
    digests = {} if digests is None else digests
    with ThreadPoolExecutor(1, "hf-collapse-read") as reader, ThreadPoolExecutor(1, "hf-collapse-sha256") as hasher:
        pools = (reader, hasher, [bytearray(_CHUNK) for _ in range(3)])  # allocated once: zero-filling costs
        if len(shards) == 1 and not plan.shard_limit:
            digests[SINGLE_FILE] = _write_shard(folder / SINGLE_FILE, shards[0], plan, pools)
        else:
            weight_map = {}
            for number, names in enumerate(shards, 1):
                file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                digests[file] = _write_shard(folder / file, names, plan, pools)
                weight_map.update(dict.fromkeys(names, file))
            index = {"metadata": {"total_size": plan.size}, "weight_map": dict(sorted(weight_map.items()))}
            (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    plan.config.architectures = [plan.model_class.__name__]
    plan.config.save_pretrained(folder)
    return {name: entry.shape for name, entry in plan.tensors.items()}


def verify_written(plan: StreamPlan, written: dict[str, tuple[int, ...]]) -> None:
    """The structure check: a model built from the new config has exactly the written tensor names and shapes."""
    differences = structure_differences(_meta_model(plan.model_class, plan.config), written)
    if differences:
        raise ValueError(f"the streamed collapse could not be verified: a model built from the new config would not "
                         f"match the written weights: {'; '.join(differences[:3])}. Rerun with --in-memory and report "
                         "this checkpoint")


def _probe_check(source, layers, staging: Path, plan: StreamPlan) -> str:
    """Load the source and the written output and compare their outputs on a probe input (the source with the same
    layers bypassed), when the weights are small enough to load twice; returns what was checked, or why not."""
    if plan.size > PROBE_LIMIT:
        return (f"not run: the weights ({plan.size / 2**30:.2f} GiB) are larger than the {PROBE_LIMIT / 2**30:.0f} GiB "
                "that the whole-model check loads twice; the structure check ran")
    # the layer count and the kept tensors' values were checked while planning and copying: a plain load is enough
    original = plan.model_class.from_pretrained(source.path).eval()
    probe = build_probe(original)
    reference = None
    if probe is not None:
        reference = reference_outputs(original, resolve_layer_selection(find_layer_stacks(original), layers), probe,
                                      given=False)
    del original
    if reference is None:
        return "not run: the model takes neither input_ids nor pixel_values that a probe built from its config fits"
    collapsed = plan.model_class.from_pretrained(staging).eval()
    differences = probe_differences(collapsed, probe, reference)
    if differences:
        raise ValueError(f"the streamed collapse could not be verified: its output differs from the original's with "
                         f"the same layers bypassed: {'; '.join(differences[:3])}. Nothing was written; rerun without "
                         "--stream and report this checkpoint")
    return "passed on the whole model: the output equals the original's with the same layers bypassed"


def collapse_streamed(
    source, plan: StreamPlan, layers: list[int], out: str | os.PathLike, *, processing_class=None,
    overwrite: bool = False, repo_id: str | None = None,
) -> tuple[Path, CollapseReport]:
    """Write the streamed collapse of `plan` (see [`plan_stream`]) to `out`, with the export's tokenizer, card,
    report and manifest, atomically; verified before it is moved into place.

    Args:
        source ([`ResolvedModel`]): the source checkpoint (folder, base model, license, limitations).
        plan ([`StreamPlan`]): what to write.
        layers (`list[int]`): the layers removed, in the source's numbering.
        out, processing_class, overwrite, repo_id: as for [`export_collapsed`].

    Raises:
        [`RecipeError`]: too little free space for the output, a truncated shard or non-finite weights (nothing left
            behind). `ValueError`: a failed check (nothing left behind).
    """
    if len(plan.layers_before) != 1:
        raise ValueError("a list of layers names the layers of a one-stack model; this model has "
                         f"{len(plan.layers_before)} stacks ({', '.join(plan.layers_before)})")
    check_room(plan, Path(out).expanduser().absolute())
    (before,) = plan.layers_before.values()
    report = CollapseReport(
        base_model=source.base_model, removed_layers=sorted(layers), layers_before=before,
        num_parameters_before=plan.parameters_before, num_parameters_after=plan.parameters_after, scores=None,
        score_method=None, selection=selection_sentence(LayerChoice(layers=tuple(layers))),
        earlier_removed=plan.earlier_removed, license=source.license, limitations=list(source.limitations),
    )

    final = [report]

    digests: dict[str, ManifestEntry] = {}

    def write_model(staging: Path) -> CollapseReport:
        verify_written(plan, write_weights(plan, staging, digests))
        _write_generation_config(source, plan, staging)
        probe = _probe_check(source, layers, staging, plan)
        final[0] = report.updated(collapse_path={"path": "streaming", "structure_check": True, "probe_check": probe})
        return final[0]

    written = export_files(out, write_model, config=plan.config, processing_class=processing_class,
                           repo_id=repo_id, overwrite=overwrite, known_digests=digests)
    return written, final[0]


def _write_generation_config(source, plan: StreamPlan, staging: Path) -> None:
    """The generation config `save_pretrained` would write: the source's, or one derived from the config."""
    if not plan.model_class.can_generate():
        return
    try:
        generation = transformers.GenerationConfig.from_pretrained(source.path)
    except OSError:
        generation = transformers.GenerationConfig.from_model_config(plan.config)
    generation.save_pretrained(staging)
