"""Tiny, randomly initialised models of every family hf-collapse supports, built from configs (no Hub).

`TINY_MODELS` maps a family name to a [`TinyModel`]: the config class and its (small) arguments, the
model class to build, the Auto class that must reload it, and the kind of inputs it takes. Test files
import it to run one matrix over all families; `build()` and `inputs()` are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
)

VOCAB = 128
# Shared shape of the text models: 4 layers of width 32, 4 query heads over 2 key/value heads.
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
)
_GEMMA = dict(_DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
_GEMMA3_TEXT = dict(_GEMMA, sliding_window_pattern=2)  # layer_types: sliding, full, sliding, full
# A larger init than GPT-2's 0.02, where tiny random models otherwise repeat one token when generating.
_GPT2 = dict(
    vocab_size=VOCAB,
    n_embd=32,
    n_layer=4,
    n_head=4,
    n_positions=64,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
)


@dataclass(frozen=True)
class TinyModel:
    """One family in the test matrix.

    Attributes:
        config_class (`str`): name of the config class in `transformers`.
        config_kwargs (`dict`): arguments that make it tiny.
        model_class (`str`): name of the model class to build.
        auto_class: the Auto class `from_pretrained` must reload the saved model with.
        kind (`str`): `"causal-lm"`, `"seq2seq"`, `"encoder"` or `"vision"` (which inputs, whether it generates).
        drop: the 0-based layers the acceptance tests remove (a dict per stack for encoder-decoders).
    """

    config_class: str
    config_kwargs: dict
    model_class: str
    auto_class: type
    kind: str
    drop: list[int] | dict[str, list[int]] = field(default_factory=lambda: [1, 2])

    @property
    def generates(self) -> bool:
        return self.kind in ("causal-lm", "seq2seq")

    def config(self) -> transformers.PreTrainedConfig:
        return getattr(transformers, self.config_class)(**self.config_kwargs)

    def build(self, seed: int = 0) -> transformers.PreTrainedModel:
        """The model in eval mode, fp32, eager attention (so every family takes the same path), seeded."""
        torch.manual_seed(seed)
        config = self.config()
        config._attn_implementation = "eager"
        model = getattr(transformers, self.model_class)(config)
        return model.eval()

    def inputs(self, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
        """Model inputs; token batches carry left padding on the first row to exercise the masks."""
        generator = torch.Generator().manual_seed(seed)
        if self.kind == "vision":
            size = self.config_kwargs["image_size"]
            return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
        ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        if self.kind == "causal-lm":
            ids[0, :2], mask[0, :2] = 0, 0
        else:
            ids[0, -2:], mask[0, -2:] = 0, 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "seq2seq":
            inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=generator)
        return inputs


TINY_MODELS: dict[str, TinyModel] = {
    "llama": TinyModel("LlamaConfig", _DECODER, "LlamaForCausalLM", AutoModelForCausalLM, "causal-lm"),
    "mistral": TinyModel(
        "MistralConfig", dict(_DECODER, sliding_window=4), "MistralForCausalLM", AutoModelForCausalLM, "causal-lm"
    ),
    # Layers 2-3 use a sliding window (max_window_layers=2); dropping layer 0 must recount it to 1.
    "qwen2": TinyModel(
        "Qwen2Config",
        dict(_DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=2),
        "Qwen2ForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
        drop=[0],
    ),
    "qwen3": TinyModel(
        "Qwen3Config",
        dict(_DECODER, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=2),
        "Qwen3ForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
        drop=[0, 3],
    ),
    "gemma2": TinyModel("Gemma2Config", _GEMMA, "Gemma2ForCausalLM", AutoModelForCausalLM, "causal-lm", drop=[0]),
    "gemma3": TinyModel(
        "Gemma3TextConfig", _GEMMA3_TEXT, "Gemma3ForCausalLM", AutoModelForCausalLM, "causal-lm", drop=[1]
    ),
    "gemma3-multimodal": TinyModel(
        "Gemma3Config",
        dict(
            text_config=_GEMMA3_TEXT,
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=16,
                patch_size=4,
            ),
            mm_tokens_per_image=4,
            image_token_id=VOCAB - 1,
            boi_token_id=VOCAB - 2,
            eoi_token_id=VOCAB - 3,
        ),
        "Gemma3ForConditionalGeneration",
        AutoModelForImageTextToText,
        "causal-lm",
        drop=[1],
    ),
    "phi3": TinyModel("Phi3Config", _DECODER, "Phi3ForCausalLM", AutoModelForCausalLM, "causal-lm"),
    "gpt2": TinyModel(
        "GPT2Config",
        dict(_GPT2),
        "GPT2LMHeadModel",
        AutoModelForCausalLM,
        "causal-lm",
    ),
    # Attention is scaled by 1/(layer_idx + 1): renumbering layers 2 and 3 to 1 and 2 changes their scale.
    "gpt2-inverse-scaling": TinyModel(
        "GPT2Config",
        dict(_GPT2, scale_attn_by_inverse_layer_idx=True),
        "GPT2LMHeadModel",
        AutoModelForCausalLM,
        "causal-lm",
        drop=[1],
    ),
    "gpt-neox": TinyModel(
        "GPTNeoXConfig",
        dict(_ENCODER, bos_token_id=1, eos_token_id=2),
        "GPTNeoXForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
    ),
    "opt": TinyModel(
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            init_std=0.2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "OPTForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
    ),
    "falcon": TinyModel(
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "FalconForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
    ),
    "bert": TinyModel("BertConfig", _ENCODER, "BertForMaskedLM", AutoModelForMaskedLM, "encoder"),
    "roberta": TinyModel(
        "RobertaConfig",
        dict(_ENCODER, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        "RobertaForMaskedLM",
        AutoModelForMaskedLM,
        "encoder",
    ),
    "distilbert": TinyModel(
        "DistilBertConfig",
        dict(
            vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=4, n_heads=4, max_position_embeddings=64, pad_token_id=0
        ),
        "DistilBertForMaskedLM",
        AutoModelForMaskedLM,
        "encoder",
    ),
    "vit": TinyModel(
        "ViTConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            num_labels=3,
        ),
        "ViTForImageClassification",
        AutoModelForImageClassification,
        "vision",
    ),
    "mixtral": TinyModel(
        "MixtralConfig",
        dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
        "MixtralForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
    ),
    # MoE where (i + 1) % 2 == 0 and i is not in mlp_only_layers: only layer 1 is sparse.
    "qwen3-moe": TinyModel(
        "Qwen3MoeConfig",
        dict(
            _DECODER,
            head_dim=8,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        ),
        "Qwen3MoeForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
        drop=[0],
    ),
    # Layers 0-1 dense, 2-3 MoE.
    "deepseek-v3": TinyModel(
        "DeepseekV3Config",
        dict(
            _DECODER,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=2,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
        "DeepseekV3ForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
    ),
    "t5": TinyModel(
        "T5Config",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=4,
            num_decoder_layers=4,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            initializer_factor=20.0,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        ),
        "T5ForConditionalGeneration",
        AutoModelForSeq2SeqLM,
        "seq2seq",
        drop={"encoder": [0, 2], "decoder": [0, 3]},
    ),
    # Beyond the families hf-collapse targets: one family per remaining per-layer config rule.
    # no_rope_layers [1, 0, 1, 0] (a NoPE layer every 2nd layer).
    "smollm3": TinyModel(
        "SmolLM3Config",
        dict(_DECODER, no_rope_layer_interval=2, initializer_range=0.2),
        "SmolLM3ForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
        drop=[0],
    ),
    # moe_layers [1, 3], no_rope_layers [1, 0, 1, 0], layer_types chunked/full alternating.
    "llama4-text": TinyModel(
        "Llama4TextConfig",
        dict(
            _DECODER,
            head_dim=8,
            intermediate_size_mlp=64,
            num_local_experts=2,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=2,
            attention_chunk_size=4,
        ),
        "Llama4ForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
        drop=[0],
    ),
    # mlp_layer_types: dense, sparse, sparse, sparse.
    "glm4-moe-lite": TinyModel(
        "Glm4MoeLiteConfig",
        dict(
            _DECODER,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
        "Glm4MoeLiteForCausalLM",
        AutoModelForCausalLM,
        "causal-lm",
        drop=[0],
    ),
    # Default pattern (global_attn_every_n_layers=3): full, sliding, sliding, full.
    "modernbert": TinyModel(
        "ModernBertConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=64,
            local_attention=4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        "ModernBertForMaskedLM",
        AutoModelForMaskedLM,
        "encoder",
        drop=[1],
    ),
}


# ---- the exact-or-refused matrix (tests/test_matrix.py) -------------------------------------------------------
# Families whose layer structure lives in hybrid patterns, "first k" integers, start/interval integers, index
# lists, backbone stages or tensors outside the layers. Each is collapsed in several ways and must come out exact
# or refused; `drop` is unused there (the cases name their own layers).
_MAMBA2 = dict(mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_n_heads=4, mamba_n_groups=1, mamba_chunk_size=8)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=16, patch_size=4)

MATRIX_MODELS: dict[str, TinyModel] = {
    # one rotary embedding per attention type: removing every full-attention layer leaves only the sliding one
    "gemma3": TINY_MODELS["gemma3"],
    "gemma3-multimodal": TINY_MODELS["gemma3-multimodal"],
    "olmo3": TinyModel(
        "Olmo3Config", dict(_DECODER, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2),
        "Olmo3ForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    # Mamba2 / attention / MoE layers by layers_block_type; mtp_layers_block_type describes the separate MTP layers
    "nemotron-h": TinyModel(
        "NemotronHConfig",
        dict(_DECODER, head_dim=8, layers_block_type=["mamba", "full_attention", "moe", "full_attention"],
             ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=8, n_routed_experts=4,
             num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
             num_nextn_predict_layers=1),
        "NemotronHForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    # layer_types conv / attention; full_attn_idxs lists the attention layers
    "lfm2": TinyModel("Lfm2Config", dict(_DECODER, full_attn_idxs=[1, 3]), "Lfm2ForCausalLM", AutoModelForCausalLM, "causal-lm"),
    # layers below num_dense_layers are dense, the others MoE
    "lfm2-moe": TinyModel(
        "Lfm2MoeConfig",
        dict(_DECODER, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_dense_layers=2,
             layer_types=["conv", "full_attention", "conv", "full_attention"]),
        "Lfm2MoeForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    # attention and experts every 2nd layer from layer 1 (period / offset integers; layer_types is a read-only property)
    "jamba": TinyModel(
        "JambaConfig",
        dict(_DECODER, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
             expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
             use_mamba_kernels=False),
        "JambaForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    # attention layers by index (attn_layer_indices), the others Mamba2; layer_types is derived
    "bamba": TinyModel(
        "BambaConfig", dict(_DECODER, attn_layer_indices=[1, 3], mamba_d_head=16, **_MAMBA2), "BambaForCausalLM",
        AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    "falcon-h1": TinyModel(
        "FalconH1Config", dict(_DECODER, mamba_d_ssm=64, mamba_use_mlp=True, **_MAMBA2), "FalconH1ForCausalLM",
        AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    "granite-moe-hybrid": TinyModel(
        "GraniteMoeHybridConfig",
        dict(_DECODER, layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=2,
             num_experts_per_tok=1, shared_intermediate_size=32, mamba_d_head=16, **_MAMBA2),
        "GraniteMoeHybridForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    "qwen3-next": TinyModel(
        "Qwen3NextConfig",
        dict(_DECODER, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
             linear_value_head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
             num_experts_per_tok=2, decoder_sparse_step=1, full_attention_interval=2),
        "Qwen3NextForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    # shared attention block: its layer_idx is -1 in every hybrid layer
    "zamba2": TinyModel(
        "Zamba2Config",
        dict(_DECODER, mamba_d_state=8, mamba_ngroups=1, mamba_headdim=8, n_mamba_heads=8, num_mem_blocks=1,
             layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], use_mem_rope=False, adapter_rank=4),
        "Zamba2ForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    # MoE where (i + 1) % 2 == 0 and 1 <= i <= 3: layers 1 and 3 (start / interval / end integers)
    "ernie4.5-moe": TinyModel(
        "Ernie4_5_MoeConfig",
        dict(_DECODER, moe_num_experts=4, moe_k=2, moe_intermediate_size=16, moe_layer_start_index=1,
             moe_layer_interval=2, moe_layer_end_index=3),
        "Ernie4_5_MoeForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    # linear attention whose decay depends on num_hidden_layers, stored in every layer
    "minimax": TinyModel(
        "MiniMaxConfig",
        dict(_DECODER, head_dim=8, num_local_experts=2, num_experts_per_tok=1, block_size=4,
             layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
        "MiniMaxForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    # per-layer embeddings sized by the layer count, outside the layer modules
    "gemma3n-text": TinyModel(
        "Gemma3nTextConfig",
        dict(_DECODER, head_dim=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, laurel_rank=4,
             altup_num_inputs=2, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0] * 4,
             intermediate_size=[64] * 4, sliding_window=4),
        "Gemma3nForCausalLM", AutoModelForCausalLM, "causal-lm",
    ),  # fmt: skip
    # a convolution applied after layer 0 only (by loop index), in the encoder
    "deberta-v2-conv": TinyModel(
        "DebertaV2Config",
        dict(_ENCODER, conv_kernel_size=3, relative_attention=True, position_buckets=8, max_relative_positions=16,
             pos_att_type=["p2c", "c2p"]),
        "DebertaV2ForMaskedLM", AutoModelForMaskedLM, "encoder",
    ),  # fmt: skip
    # stage_names stem, stage1..stage4; the backbone returns stage2 and stage4
    "dinov2-backbone": TinyModel(
        "Dinov2Config", dict(_VISION, out_features=["stage2", "stage4"]), "Dinov2Backbone", transformers.Dinov2Backbone,
        "vision",
    ),  # AutoBackbone.from_pretrained does not take a local folder in transformers 5
    # hierarchical: each "layer" is a stage of another width
    "swin": TinyModel(
        "SwinConfig",
        dict(image_size=32, patch_size=2, embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2], window_size=2),
        "SwinModel", AutoModel, "vision",
    ),  # fmt: skip
    # multimodal text stacks
    "llava": TinyModel(
        "LlavaConfig",
        dict(text_config=dict(_DECODER, model_type="llama"), image_token_id=VOCAB - 1,
             vision_config=dict(_VISION, model_type="clip_vision_model", projection_dim=32)),
        "LlavaForConditionalGeneration", AutoModelForImageTextToText, "causal-lm",
    ),  # fmt: skip
    "qwen2-vl": TinyModel(
        "Qwen2VLConfig",
        dict(text_config=dict(_DECODER, model_type="qwen2_vl_text",
                              rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=10000.0)),
             vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=2,
                                spatial_merge_size=1, temporal_patch_size=1),
             image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3),
        "Qwen2VLForConditionalGeneration", AutoModelForImageTextToText, "causal-lm",
    ),  # fmt: skip
}


# ---- a tiny causal-LM source for recipe runs (run_recipe, `hf-collapse train`, accelerate launches) ----------------


def write_lm_source(folder, *, model: str = "src", text_chars: int = 6000, **shape):
    """`folder/model`: a randomly initialised Llama (seed 0) with SmolLM2's tokenizer, 4 layers of width 32 unless
    `shape` changes its config; `folder/train.txt`: the first `text_chars` characters of Hamlet. Returns `folder`."""
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_collapse.assets import shakespeare_works, smollm2_path

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64} | shape
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **config)).save_pretrained(folder / model)
    tokenizer.save_pretrained(folder / model)
    (folder / "train.txt").write_text(shakespeare_works()["hamlet"][:text_chars])
    return folder


def write_lm_recipe(path, source, work, fields: str, *, max_steps: int, train_batch: int = 4):
    """A causal-LM recipe at `path` on `write_lm_source(source)`'s model and text, on CPU, training in `work/run` and
    exporting to `work/out`, with `fields` (YAML lines) after the shared ones. Returns `path`."""
    path.write_text(
        f"model_name_or_path: {source / 'src'}\ntask: causal-lm\ndataset_files: [{source / 'train.txt'}]\n"
        f"max_length: 32\noutput_dir: {work / 'run'}\nexport_dir: {work / 'out'}\nmax_steps: {max_steps}\n"
        f"per_device_train_batch_size: {train_batch}\nper_device_eval_batch_size: 8\nmax_eval_samples: 8\n"
        "report_to: none\nsave_strategy: 'no'\nuse_cpu: true\n" + fields
    )
    return path
