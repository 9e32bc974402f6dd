"""Layer scores (MSW, Block Influence, angular distance) and the selection policies built on them.

The known-answer cases zero a layer's output projections: in a pre-norm Llama that layer is then
exactly the identity, in a post-norm BERT (fresh LayerNorms) it is the identity up to rounding.
"""

from __future__ import annotations

import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_collapse.layers import bypass_layers, find_layer_stacks
from hf_collapse.msw import DirectionSearch, max_sliced_wasserstein
from hf_collapse.scoring import (
    LayerScores,
    score_layers,
    select_by_tolerance,
    select_explicit,
    select_lowest,
)

VOCAB = 64
NUM_LAYERS = 4
# The modules whose zeroing turns a layer into the identity, per family.
OUTPUT_PROJECTIONS = {
    "bert": ("attention.output.dense", "output.dense"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
}
METHODS = ("msw", "block_influence", "angular")


def build(family: str, identity: tuple[int, ...] = ()) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
            initializer_range=0.1,  # layers that visibly move the tokens, against the identity layer
        )
        model = BertForSequenceClassification(config)
    else:
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    layers = find_layer_stacks(model)[0].layers
    with torch.no_grad():
        for index in identity:
            for path in OUTPUT_PROJECTIONS[family]:
                for param in layers[index].get_submodule(path).parameters():
                    param.zero_()
    return model.eval()


def rows(seed: int, lengths: list[int]) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (n,), generator=generator).tolist()} for n in lengths]


def pad(batch_rows: list[dict], extra: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one plus `extra` columns."""
    length = max(len(r["input_ids"]) for r in batch_rows) + extra
    ids = torch.zeros(len(batch_rows), length, dtype=torch.long)
    mask = torch.zeros(len(batch_rows), length, dtype=torch.long)
    for i, r in enumerate(batch_rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


ROWS = rows(0, [7, 3, 11, 5, 9, 2])
BATCHES = [pad(ROWS[:3]), pad(ROWS[3:])]


def captured_pairs(model: torch.nn.Module, batches: list[dict]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch, per layer: the (input, output) real tokens, read with the test's own hooks."""
    stack = find_layer_stacks(model)[0]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(index):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            seen[index] = (hidden_in, output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(stack.layers)]
    pairs = []
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                model(**batch)
                mask = batch["attention_mask"].bool()
                pairs.append([(seen[i][0][mask], seen[i][1][mask]) for i in range(len(stack))])
    finally:
        for handle in handles:
            handle.remove()
    return pairs


# ---------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_identity_layer_scores_zero_and_ranks_first(family, method):
    scores = score_layers(build(family, identity=(2,)), BATCHES, method=method, progress=False)
    assert scores.method == method and scores.stack == "" and len(scores) == NUM_LAYERS
    assert scores.num_tokens == sum(len(r["input_ids"]) for r in ROWS)
    assert scores.values[2] < 1e-6
    assert scores.values[2] < 1e-4 * min(v for i, v in enumerate(scores.values) if i != 2)
    assert scores.ranking()[0] == 2
    if family == "llama":  # pre-norm: the zeroed layer is exactly the identity
        assert scores.values[2] == 0.0


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_reference_values_from_own_hooks(family):
    model = build(family)
    pairs = captured_pairs(model, BATCHES)
    for method, per_token in (
        ("block_influence", lambda cos: 1 - cos),
        ("angular", lambda cos: torch.arccos(cos.clamp(-1, 1)) / math.pi),
    ):
        expected = [
            torch.cat([per_token(F.cosine_similarity(x, y, dim=-1)) for x, y in (b[i] for b in pairs)]).mean().item()
            for i in range(NUM_LAYERS)
        ]
        scores = score_layers(model, BATCHES, method=method, progress=False)
        assert scores.values == pytest.approx(expected, abs=1e-5, rel=1e-4)

    # MSW: the token-weighted mean of per-batch distances, same seeded search, same call order.
    search = DirectionSearch(seed=5)
    totals = [0.0] * NUM_LAYERS
    for batch_pairs in pairs:
        for i, (x, y) in enumerate(batch_pairs):
            totals[i] += max_sliced_wasserstein(x, y, search=search, key=i).item() * x.shape[0]
    expected = [t / sum(len(r["input_ids"]) for r in ROWS) for t in totals]
    scores = score_layers(model, BATCHES, method="msw", direction_search=DirectionSearch(seed=5), progress=False)
    assert scores.values == pytest.approx(expected, rel=1e-5)
    assert min(scores.values) > 0


def test_relative_msw_divides_each_batch_by_its_input_rms_and_can_change_the_ranking():
    model = build("llama")
    with torch.no_grad():  # layer 3's input becomes large; pre-norm, its update does not grow with it
        find_layer_stacks(model)[0].layers[2].mlp.down_proj.weight.mul_(200.0)
    pairs = captured_pairs(model, BATCHES)
    search = DirectionSearch(seed=5)
    totals = [0.0] * NUM_LAYERS
    for batch_pairs in pairs:
        for i, (x, y) in enumerate(batch_pairs):
            rms = x.pow(2).mean().sqrt().item()
            totals[i] += max_sliced_wasserstein(x, y, search=search, key=i).item() * x.shape[0] / rms
    expected = [t / sum(len(r["input_ids"]) for r in ROWS) for t in totals]
    relative = score_layers(
        model, BATCHES, method="msw", normalization="input_rms", direction_search=DirectionSearch(seed=5), progress=False
    )
    raw = score_layers(model, BATCHES, method="msw", direction_search=DirectionSearch(seed=5), progress=False)
    assert relative.values == pytest.approx(expected, rel=1e-5)
    assert relative.ranking()[0] == 3 and raw.ranking()[0] != 3  # raw, the input's scale hides layer 3's small update
    for method in ("block_influence", "angular"):  # scale-free already: the option changes nothing
        assert score_layers(model, BATCHES, method=method, normalization="input_rms", progress=False).values == (
            score_layers(model, BATCHES, method=method, progress=False).values
        )
    with pytest.raises(ValueError, match="unknown normalization 'l2': choose one of none, input_rms"):
        score_layers(model, BATCHES, normalization="l2", progress=False)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_extra_padding_changes_nothing(family, method):
    model = build(family)
    tight = score_layers(model, BATCHES, method=method, progress=False)
    padded = [pad(ROWS[:3], extra=5), pad(ROWS[3:], extra=9)]
    loose = score_layers(model, padded, method=method, progress=False)
    assert loose.num_tokens == tight.num_tokens
    assert loose.values == pytest.approx(tight.values, rel=1e-4, abs=1e-6)


def test_msw_is_deterministic_for_a_seed():
    model = build("llama")
    first = score_layers(model, BATCHES, progress=False)
    again = score_layers(model, BATCHES, progress=False)
    assert first.values == again.values
    seeded = [
        score_layers(model, BATCHES, direction_search=DirectionSearch(seed=3, mode="random"), progress=False).values
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    other_seed = score_layers(model, BATCHES, direction_search=DirectionSearch(seed=4, mode="random"), progress=False)
    assert other_seed.values != seeded[0]


def test_eval_mode_during_scoring_and_modes_restored():
    model = build("bert")
    expected = score_layers(model, BATCHES, method="block_influence", progress=False).values
    model.train()
    model.classifier.eval()  # a mixed state must come back as it was
    scores = score_layers(model, BATCHES, method="block_influence", progress=False)
    assert scores.values == expected  # dropout was off
    assert model.training and model.bert.encoder.layer[0].output.dropout.training
    assert not model.classifier.training


def test_data_forms_give_the_same_scores():
    words = "the a movie film was is good bad great awful plot acting".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    texts = ["the movie was good", "bad plot", "a great film the acting was awful", "good", "the plot is great"]
    model = build("bert")

    from_texts = score_layers(model, texts, tokenizer=tokenizer, method="block_influence", batch_size=2, progress=False)
    encoded = tokenizer(texts)
    table = datasets.Dataset.from_dict({"text": texts, "label": [1, 0, 0, 1, 1], **encoded})
    from_dataset = score_layers(model, table, method="block_influence", batch_size=2, progress=False)
    by_hand = [pad([{"input_ids": ids} for ids in encoded["input_ids"][i : i + 2]]) for i in (0, 2, 4)]
    from_loader = score_layers(model, iter(by_hand), method="block_influence", progress=False)
    other_grouping = score_layers(model, texts, tokenizer=tokenizer, method="block_influence", batch_size=3, progress=False)

    assert from_texts.num_tokens == sum(len(ids) for ids in encoded["input_ids"]) == 18
    assert from_dataset.values == pytest.approx(from_texts.values, rel=1e-5)
    assert from_loader.values == pytest.approx(from_texts.values, rel=1e-5)
    # Block Influence is a per-token mean: the grouping into batches does not matter.
    assert other_grouping.values == pytest.approx(from_texts.values, rel=1e-4)
    truncated = score_layers(model, texts, tokenizer=tokenizer, max_length=2, method="angular", progress=False)
    assert truncated.num_tokens == 9


def test_encoder_decoder_needs_a_stack_name():
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4)
    model = T5ForConditionalGeneration(config).eval()
    batch = dict(BATCHES[0])
    batch["decoder_input_ids"] = batch["input_ids"][:, :4]
    batch["decoder_attention_mask"] = batch["attention_mask"][:, :4]
    with pytest.raises(ValueError, match="stack='encoder' or stack='decoder'"):
        score_layers(model, [batch], progress=False)
    decoder = score_layers(model, [batch], stack="decoder", method="angular", progress=False)
    assert decoder.stack == "decoder" and len(decoder) == 3
    assert decoder.num_tokens == int(batch["decoder_attention_mask"].sum())
    encoder = score_layers(model, [batch], stack="encoder", method="angular", progress=False)
    assert len(encoder) == 2 and encoder.num_tokens == int(batch["attention_mask"].sum())


def test_scoring_errors():
    model = build("llama")
    with pytest.raises(ValueError, match="empty"):
        score_layers(model, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        score_layers(model, iter([]), progress=False)
    all_padding = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="no batch held a real"):
        score_layers(model, [all_padding], progress=False)
    with pytest.raises(ValueError, match="unknown scoring method 'cosine'"):
        score_layers(model, BATCHES, method="cosine", progress=False)
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        score_layers(model, ["some text"], progress=False)
    with pytest.raises(TypeError, match="wrap it in a list"):
        score_layers(model, "some text", progress=False)
    with pytest.raises(ValueError, match="input_ids column"):
        score_layers(model, [{"text": "some text"}], progress=False)
    with pytest.raises(ValueError, match="unknown layer stack 'decoder'"):
        score_layers(model, BATCHES, stack="decoder", progress=False)


# ---------------------------------------------------------------------------------------------------
# Budget and explicit selection
# ---------------------------------------------------------------------------------------------------

SIX = LayerScores(method="msw", values=(0.5, 0.1, 0.3, 0.05, 0.2, 0.9))


def test_ranking_and_budget():
    assert SIX.ranking() == [3, 1, 4, 2, 0, 5]
    assert select_lowest(SIX, 2) == [1, 3]
    assert select_lowest(SIX, 3, protect_last=3) == [0, 1, 2]
    assert select_lowest(SIX, 2, protect_first=2) == [3, 4]
    assert select_lowest(SIX, 5) == [0, 1, 2, 3, 4]
    ties = LayerScores(method="angular", values=(0.2, 0.1, 0.1, 0.1))
    assert select_lowest(ties, 2) == [1, 2]


def test_budget_errors():
    with pytest.raises(ValueError, match="k must be at least 1"):
        select_lowest(SIX, 0)
    with pytest.raises(ValueError, match="removing 6 of 6 layers is refused"):
        select_lowest(SIX, 6)
    with pytest.raises(ValueError, match="only 2 layers may be removed"):
        select_lowest(SIX, 3, protect_first=2, protect_last=2)
    with pytest.raises(ValueError, match="protect all 6 layers"):
        select_lowest(SIX, 1, protect_first=3, protect_last=3)
    with pytest.raises(ValueError, match="protect_first must be 0 or more"):
        select_lowest(SIX, 1, protect_first=-1)
    with pytest.raises(ValueError, match="one value per layer"):
        LayerScores(method="msw", values=())


def test_explicit_selection():
    assert select_explicit([4, 1], 6) == [1, 4]
    assert select_explicit((2,), 6, protect_first=2, protect_last=3) == [2]
    with pytest.raises(ValueError, match="layer 6 does not exist: the model has 6 layers, numbered 0-5"):
        select_explicit([1, 6], 6)
    with pytest.raises(ValueError, match="duplicate"):
        select_explicit([1, 1], 6)
    with pytest.raises(ValueError, match="no layer was chosen"):
        select_explicit([], 6)
    with pytest.raises(ValueError, match="removing all 6 layers is refused"):
        select_explicit(range(6), 6)
    with pytest.raises(ValueError, match=r"layers \[0, 5\] are protected"):
        select_explicit([0, 2, 5], 6, protect_first=1, protect_last=1)


# ---------------------------------------------------------------------------------------------------
# Tolerance loop
# ---------------------------------------------------------------------------------------------------


class LogitGap:
    """Metric: minus the mean |logits - full-depth logits| on a fixed batch (0 = unchanged, higher is better)."""

    def __init__(self, model, sign: float = -1.0):
        self.batch = pad(rows(1, [6, 9, 4]))
        self.sign = sign
        with torch.no_grad():
            self.reference = model(**self.batch).logits
        self.calls: list[bool] = []

    def __call__(self, model) -> float:
        self.calls.append(model.training)
        with torch.no_grad():
            logits = model(**self.batch).logits
        return self.sign * (logits - self.reference).abs().mean().item()


@pytest.fixture(scope="module")
def two_identity():
    model = build("llama", identity=(1, 3))
    scores = score_layers(model, BATCHES, method="block_influence", progress=False)
    return model, scores


def bypassed_metric(model, metric, layers) -> float:
    with bypass_layers(model, list(layers)):
        return metric(model)


def test_tolerance_removes_exactly_the_identity_layers(two_identity):
    model, scores = two_identity
    assert scores.values[1] == scores.values[3] == 0.0
    third = scores.ranking()[2]
    metric = LogitGap(model)
    model.train()
    chosen = select_by_tolerance(model, scores, metric, tolerance=1e-6)
    assert chosen.layers == (1, 3)
    assert chosen.baseline == 0.0
    assert [step for step, _ in chosen.curve] == [(), (1,), (1, 3), (1, 3, third)]
    assert [value for _, value in chosen.curve[:3]] == [0.0, 0.0, 0.0]
    expected = bypassed_metric(model.eval(), metric, [1, 3, third])
    assert chosen.curve[3][1] == pytest.approx(expected) and expected < -1e-3
    assert metric.calls[:4] == [False] * 4  # evaluated in eval mode ...
    model.train()
    select_by_tolerance(model, scores, metric, tolerance=1e-6)
    assert model.training  # ... and the mode restored
    model.eval()
    # The model is untouched: no hook left behind, the same outputs.
    assert all(not layer._forward_hooks for layer in find_layer_stacks(model)[0].layers)
    assert metric(model) == 0.0


def test_tolerance_limits_and_protection(two_identity):
    model, scores = two_identity
    metric = LogitGap(model)
    capped = select_by_tolerance(model, scores, metric, tolerance=1e-6, max_layers=1)
    assert capped.layers == (1,) and [s for s, _ in capped.curve] == [(), (1,)]

    protected = select_by_tolerance(model, scores, metric, tolerance=1e-6, protect_last=1)
    assert protected.layers == (1,)
    assert protected.curve[-1][0][:1] == (1,) and 3 not in protected.curve[-1][0]
    assert protected.curve[-1][1] < -1e-3

    generous = select_by_tolerance(model, scores, metric, tolerance=math.inf)
    assert len(generous.layers) == NUM_LAYERS - 1 and len(generous.curve) == NUM_LAYERS
    budget = select_by_tolerance(model, scores, metric, tolerance=math.inf, max_layers=2, strategy="measured")
    assert budget.layers == (1, 3) and len(budget.curve) == 3

    as_loss = select_by_tolerance(model, scores, LogitGap(model, sign=1.0), tolerance=1e-6, higher_is_better=False)
    assert as_loss.layers == (1, 3) and as_loss.curve[-1][1] > 1e-3


def test_measured_strategy_beats_a_misleading_ranking(two_identity):
    model, _ = two_identity
    misleading = LayerScores(method="msw", values=(0.0, 0.2, 0.1, 0.3))
    ranked = select_by_tolerance(model, misleading, LogitGap(model), tolerance=1e-6)
    assert ranked.layers == () and [s for s, _ in ranked.curve] == [(), (0,)]

    metric = LogitGap(model)
    measured = select_by_tolerance(model, misleading, metric, tolerance=1e-6, strategy="measured")
    assert measured.layers == (1, 3)
    assert [s for s, _ in measured.curve[:3]] == [(), (1,), (1, 3)]
    assert measured.curve[3][0][:2] == (1, 3) and measured.curve[3][1] < -1e-3
    assert len(metric.calls) == 1 + 4 + 3 + 2  # baseline, then every remaining candidate per step

    one_candidate = select_by_tolerance(
        model, misleading, LogitGap(model), tolerance=1e-6, strategy="measured", num_candidates=1
    )
    assert one_candidate == ranked


def test_measured_selection_keeps_every_trial_and_its_cost(two_identity):
    model, _ = two_identity
    misleading = LayerScores(method="msw", values=(0.0, 0.2, 0.1, 0.3))
    metric = LogitGap(model)
    measured = select_by_tolerance(model, misleading, metric, tolerance=1e-6, strategy="measured")
    assert measured.evaluations == len(metric.calls) == 10 and measured.seconds > 0
    assert [step for step, _, _ in measured.trials] == [0, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert measured.trials[0] == (0, (), 0.0)
    # every trial's metric is what that bypass really gives
    for _, layers, value in measured.trials:
        assert value == pytest.approx(bypassed_metric(model, metric, layers))
    costs = measured.removal_costs()
    assert sorted(costs) == [0, 1, 2, 3]
    assert costs[1] == costs[3] == 0.0 and costs[0] > 1e-3 and costs[2] > 1e-3
    # a metric where lower is better: costs stay positive for harmful removals
    as_loss = select_by_tolerance(
        model, misleading, LogitGap(model, sign=1.0), tolerance=1e-6, strategy="measured", higher_is_better=False
    )
    assert as_loss.removal_costs() == pytest.approx(costs)
    # rank first and measure only the best two: 1 + 2 + 2 + ... evaluations
    few = select_by_tolerance(model, misleading, LogitGap(model), tolerance=math.inf, max_layers=2, strategy="measured", num_candidates=2)
    assert few.evaluations == 1 + 2 + 2 and {l[0] for s, l, _ in few.trials if s == 1} == {0, 2}


def test_selection_progress_counts_evaluations_against_the_most_possible(two_identity, capsys):
    model, _ = two_identity
    misleading = LayerScores(method="msw", values=(0.0, 0.2, 0.1, 0.3))
    select_by_tolerance(model, misleading, LogitGap(model), tolerance=1e-6, strategy="measured")
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "choosing layers (measured)" in bar and "10/10" in bar  # 1 + 4 + 3 + 2 evaluations
    select_by_tolerance(model, misleading, LogitGap(model), tolerance=1e-6)
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "choosing layers (ranked)" in bar and "2/4" in bar and "without [0]" in bar  # stopped early
    select_by_tolerance(model, misleading, LogitGap(model), tolerance=1e-6, progress=False)
    assert "choosing layers" not in capsys.readouterr().err


def test_tolerance_errors(two_identity):
    model, scores = two_identity
    metric = LogitGap(model)
    with pytest.raises(ValueError, match="removing all 4 layers, which is refused"):
        select_by_tolerance(model, scores, metric, tolerance=0.1, max_layers=4)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="tolerance must be a number >= 0"):
            select_by_tolerance(model, scores, metric, tolerance=bad)
    with pytest.raises(ValueError, match="the scores cover 6 layers but the model stack has 4"):
        select_by_tolerance(model, SIX, metric, tolerance=0.1)
    with pytest.raises(ValueError, match="num_candidates only applies to strategy='measured'"):
        select_by_tolerance(model, scores, metric, tolerance=0.1, num_candidates=2)
    with pytest.raises(ValueError, match="unknown selection strategy"):
        select_by_tolerance(model, scores, metric, tolerance=0.1, strategy="greedy")
    with pytest.raises(ValueError, match="protect all 4 layers"):
        select_by_tolerance(model, scores, metric, tolerance=0.1, protect_first=2, protect_last=2)
    with pytest.raises(ValueError, match=r"evaluate_fn returned nan with layers \[\] bypassed"):
        select_by_tolerance(model, scores, lambda m: float("nan"), tolerance=0.1)
    assert all(not layer._forward_hooks for layer in find_layer_stacks(model)[0].layers)
