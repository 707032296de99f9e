"""Key rules and layout configs on synthetic key lists: milliseconds each, no model, no file."""

from __future__ import annotations

import pytest

from converter.accounting import MERGED, SUPERSEDED, WRITTEN
from converter.errors import ConvertError
from converter.keymap import split_components
from converter.layout import ANYWHERE_WRAPPERS, load_layout
from converter.peft.keys import (
    base_key,
    classify_adapter_keys,
    component_keys,
    is_trained_state,
    normalized,
    plain_keys,
    read_layout,
)

P = "base_model.model."


@pytest.fixture(scope="module")
def pano():
    return load_layout("panorama_vlm")


def _lm(*keys: str, attribute: str = "model.") -> list[str]:
    return [f"{attribute}language_model.{P}{k}" for k in keys]


def test_components_claim_keys_behind_an_attribute_and_outer_wrappers(pano):
    keys = [
        "_forward_module.module.net.vision_encoder.embeddings.patch_embedding.weight",
        "_forward_module.module.net.resampler.queries",
        "_forward_module.module.net.projector.0.weight",
        f"_forward_module.module.net.language_model.{P}lm_head.weight",
    ]
    split = split_components(keys, pano)
    assert (split.outer.prefix, split.outer.wrappers, split.outer.attribute, split.outer.removed) == (
        "module.net.",  # Fabric's _forward_module is removed wherever it stands, DDP's module in front of the keys
        ("module",),
        "net",
        ("_forward_module",),
    )
    assert split.keys == {
        "vision_encoder": {"embeddings.patch_embedding.weight": keys[0]},
        "resampler": {"queries": keys[1]},
        "projector": {"0.weight": keys[2]},
        "language_model": {f"{P}lm_head.weight": keys[3]},
    }
    assert split.unclaimed == []


def test_wrappers_inside_a_component(pano):
    """torch.compile of an inner module (``_orig_mod.`` inside it, at any depth), DDP around a component
    (``module.`` right after the component's prefix): the same component keys as without them."""
    keys = [
        f"model.language_model._orig_mod.{P}model.layers.0.mlp.up_proj.lora_A.default.weight",
        "model.projector.module.0.weight",
        "model.resampler._orig_mod.module.queries",
    ]
    split = split_components(keys, pano)
    assert split.keys["language_model"] == {f"{P}model.layers.0.mlp.up_proj.lora_A.default.weight": keys[0]}
    assert split.keys["projector"] == {"0.weight": keys[1]}
    assert split.keys["resampler"] == {"queries": keys[2]}
    assert split.outer.removed == ("_orig_mod",) and split.unclaimed == []


def test_inner_wrappers_are_removed_wherever_they_stand(pano):
    keys = [
        f"model.language_model._fsdp_wrapped_module.{P}model.layers.0._checkpoint_wrapped_module.mlp.up_proj"
        ".base_layer.weight",
        "model._fsdp_wrapped_module.projector.0.weight",
    ]
    split = split_components(keys, pano)
    assert split.keys["language_model"] == {f"{P}model.layers.0.mlp.up_proj.base_layer.weight": keys[0]}
    assert split.keys["projector"] == {"0.weight": keys[1]}


def test_two_keys_that_name_one_tensor_are_an_error(pano):
    keys = ["model.projector.0.weight", "model.projector._checkpoint_wrapped_module.0.weight"]
    with pytest.raises(ConvertError, match="^two checkpoint keys name the same tensor 'model.projector.0.weight'"):
        split_components(keys, pano)


def test_unclaimed_and_dropped_keys(tmp_path):
    config = tmp_path / "layout.yaml"
    config.write_text(
        "components:\n  - {name: head, prefix: head., kind: state_dict}\n"
        "drop:\n  - {pattern: '^ema\\.', reason: EMA copy}\n"
    )
    layout = load_layout(str(config))
    split = split_components(["m.head.w", "m.ema.head.w", "m.other.w"], layout)
    assert (split.keys, split.dropped, split.unclaimed) == (
        {"head": {"w": "m.head.w"}},
        {"EMA copy": ["m.ema.head.w"]},
        ["m.other.w"],
    )
    with pytest.raises(ConvertError, match=r"^1 checkpoint keys belong to no component of layout.yaml: m.other.w;"):
        split.raise_for_unclaimed(layout)


def test_lora_modules_to_save_and_originals_map_to_plain_names():
    keys = [
        f"{P}model.layers.0.self_attn.q_proj.base_layer.weight",
        f"{P}model.layers.0.self_attn.q_proj.base_layer.bias",
        f"{P}model.layers.0.self_attn.q_proj.lora_A.default.weight",
        f"{P}model.layers.0.self_attn.q_proj.lora_B.default.weight",
        f"{P}model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight",
        f"{P}model.embed_tokens.original_module.weight",
        f"{P}model.embed_tokens.modules_to_save.default.weight",
        f"{P}model.norm.weight",
    ]
    plain, fates = plain_keys(keys, "default")
    assert plain == {
        "model.layers.0.self_attn.q_proj.weight": keys[0],
        "model.layers.0.self_attn.q_proj.bias": keys[1],
        "model.embed_tokens.weight": keys[6],
        "model.norm.weight": keys[7],
    }
    assert fates == {MERGED: keys[:5], SUPERSEDED: [keys[5]], WRITTEN: keys[6:]}
    layout = read_layout(keys, "here")
    assert (layout.adapter_name, layout.adapted, layout.modules_to_save, layout.tuner) == (
        "default",
        ("model.layers.0.self_attn.q_proj",),
        ("model.embed_tokens",),
        "LORA",
    )
    assert "lora_magnitude_vector" in layout.segments and not layout.legacy


def test_embedding_lora_maps_to_the_embedding_weight():
    keys = [
        f"{P}model.embed_tokens.base_layer.weight",
        f"{P}model.embed_tokens.lora_embedding_A.pano",
        f"{P}model.embed_tokens.lora_embedding_B.pano",
        f"{P}lm_head.base_layer.weight",
        f"{P}lm_head.lora_A.pano.weight",
        f"{P}lm_head.lora_B.pano.weight",
    ]
    plain, fates = plain_keys(keys, "pano")
    assert plain == {"model.embed_tokens.weight": keys[0], "lm_head.weight": keys[3]}
    assert fates == {MERGED: keys}
    layout = read_layout(keys, "here")
    assert layout.merged_modules == ("lm_head", "model.embed_tokens")
    assert [is_trained_state(k, "pano") for k in keys] == [False, True, True, False, True, True]
    assert [base_key(k, "pano") for k in keys] == [
        "model.embed_tokens.weight",
        None,
        None,
        "lm_head.weight",
        None,
        None,
    ]


def test_trainable_tokens_map_to_the_embedding_weight():
    keys = [
        f"{P}model.embed_tokens.token_adapter.base_layer.weight",
        f"{P}model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        f"{P}model.layers.0.self_attn.q_proj.base_layer.weight",
        f"{P}model.layers.0.self_attn.q_proj.lora_A.default.weight",
        f"{P}model.layers.0.self_attn.q_proj.lora_B.default.weight",
    ]
    plain, fates = plain_keys(keys, "default")
    assert plain == {"model.embed_tokens.weight": keys[0], "model.layers.0.self_attn.q_proj.weight": keys[2]}
    assert fates == {MERGED: keys}
    layout = read_layout(keys, "here")
    assert layout.token_modules == ("model.embed_tokens",)
    assert layout.merged_modules == ("model.embed_tokens", "model.layers.0.self_attn.q_proj")
    assert layout.tuners[0] == "LORA"  # trainable tokens ride along with LoRA


def test_other_tuners_keys_map_the_same_way():
    """LoHa's factors, OFT's rotation, VeRA's shared projection and IA3's vector: no list of ours names them."""
    keys = [
        f"{P}model.layers.0.self_attn.q_proj.base_layer.weight",
        f"{P}model.layers.0.self_attn.q_proj.hada_w1_a.default",
        f"{P}model.layers.0.self_attn.q_proj.hada_w1_b.default",
        f"{P}model.layers.0.self_attn.v_proj.base_layer.weight",
        f"{P}model.layers.0.self_attn.v_proj.hada_w2_a.default",
        f"{P}model.norm.weight",
    ]
    plain, fates = plain_keys(keys, "default")
    assert plain == {
        "model.layers.0.self_attn.q_proj.weight": keys[0],
        "model.layers.0.self_attn.v_proj.weight": keys[3],
        "model.norm.weight": keys[5],
    }
    assert fates == {MERGED: keys[:5], WRITTEN: keys[5:]}
    assert read_layout(keys, "here").tuner == "LOHA"
    vera = [
        f"{P}a.q_proj.base_layer.weight",
        f"{P}a.q_proj.vera_lambda_b.x",
        f"{P}a.q_proj.vera_A.x",
        "base_model.vera_A.x",
    ]
    layout = read_layout(vera, "here")
    assert (layout.tuner, layout.shared, layout.adapted) == ("VERA", ("base_model.vera_A.x",), ("a.q_proj",))
    assert plain_keys(vera, "x") == ({"a.q_proj.weight": vera[0]}, {MERGED: vera})
    assert [is_trained_state(k, "x") for k in vera] == [False, True, False, True]  # vera_A per layer: a reference
    assert read_layout([f"{P}a.ia3_l.default", f"{P}a.base_layer.weight"], "here").tuner == "IA3"
    assert read_layout([f"{P}a.oft_R.default.weight", f"{P}a.base_layer.weight"], "here").tuner == "OFT"
    adalora = [f"{P}a.lora_A.default", f"{P}a.lora_E.default", f"{P}a.ranknum.default", f"{P}a.base_layer.weight"]
    assert read_layout(adalora, "here").tuner == "ADALORA"


def test_pre_0_7_names_are_renamed_to_todays():
    """PEFT before 0.7 kept an adapted module's own weights at <module>.weight (no base_layer)."""
    keys = {
        f"{P}model.layers.0.self_attn.q_proj.weight": "m.q.w",
        f"{P}model.layers.0.self_attn.q_proj.bias": "m.q.b",
        f"{P}model.layers.0.self_attn.q_proj.lora_A.default.weight": "m.q.a",
        f"{P}model.layers.0.self_attn.q_proj.lora_B.default.weight": "m.q.bb",
        f"{P}model.norm.weight": "m.n",
    }
    layout = read_layout(keys, "here")
    assert layout.legacy and layout.base_layers == 1
    assert normalized(keys, layout) == {
        f"{P}model.layers.0.self_attn.q_proj.base_layer.weight": "m.q.w",
        f"{P}model.layers.0.self_attn.q_proj.base_layer.bias": "m.q.b",
        f"{P}model.layers.0.self_attn.q_proj.lora_A.default.weight": "m.q.a",
        f"{P}model.layers.0.self_attn.q_proj.lora_B.default.weight": "m.q.bb",
        f"{P}model.norm.weight": "m.n",
    }
    analysis = component_keys(keys, "here")
    assert analysis.plain == {
        "model.layers.0.self_attn.q_proj.weight": f"{P}model.layers.0.self_attn.q_proj.base_layer.weight",
        "model.layers.0.self_attn.q_proj.bias": f"{P}model.layers.0.self_attn.q_proj.base_layer.bias",
        "model.norm.weight": f"{P}model.norm.weight",
    }
    frozen_only = {f"{P}a.lora_A.default.weight": "x", f"{P}a.lora_B.default.weight": "y"}  # no base weights saved
    assert not read_layout(frozen_only, "here").legacy


def test_adapter_folder_keys_are_classified_by_peft_naming():
    classified = classify_adapter_keys(
        [
            f"{P}model.layers.0.self_attn.q_proj.lora_A.weight",
            f"{P}model.layers.0.self_attn.q_proj.lora_B.weight",
            f"{P}model.embed_tokens.lora_embedding_A",
            f"{P}model.embed_tokens.lora_embedding_B",
            f"{P}model.embed_tokens.base_layer.weight",
            f"{P}model.embed_tokens.token_adapter.trainable_tokens_delta",
            f"{P}lm_head.weight",
            f"{P}model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        ]
    )
    assert classified.adapted == ("model.embed_tokens", "model.layers.0.self_attn.q_proj")
    assert classified.modules_to_save == ("lm_head",)
    assert classified.token_modules == ("model.embed_tokens",)
    assert classified.base_layers == ("model.embed_tokens",)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            [f"{P}a.lora_A.x.weight", f"{P}a.lora_B.x.weight", f"{P}b.lora_A.y.weight", f"{P}b.lora_B.y.weight"],
            "here: the checkpoint holds several adapters (x, y); ckpt2hf merges one;",
        ),
        ([f"{P}a.weight"], "here: PEFT-wrapped keys without any adapter tensors; nothing to merge"),
    ],
    ids=["several-adapters", "no-adapter"],
)
def test_peft_layouts_that_cannot_be_merged(keys, message):
    with pytest.raises(ConvertError) as caught:
        read_layout(keys, "here")
    assert str(caught.value).startswith(message)


def test_a_component_without_peft_keys_is_written_as_is():
    analysis = component_keys({"a.weight": "m.x.a.weight"}, "here")
    assert (analysis.peft, analysis.plain, analysis.fates) == (None, {"a.weight": "a.weight"}, {WRITTEN: ("a.weight",)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("components: []", "no components"),
        ("- a\n- b", "expected a mapping with components"),
        ("components:\n  - {name: a, prefix: a, kind: state_dict}", "components[0].prefix 'a' must end with a dot"),
        ("components:\n  - {name: a, prefix: a., kind: onnx}", "components[0].kind is 'onnx', expected one of"),
        ("components:\n  - {name: a, prefix: a.}", "components[0] needs name, prefix and kind"),
        (
            "components:\n  - {name: a, prefix: a., kind: state_dict}\n  - {name: a, prefix: b., kind: state_dict}",
            "component names must be unique",
        ),
        (
            "components:\n  - {name: a, prefix: a., kind: state_dict}\ndrop:\n  - {pattern: 'ema', reason: x}",
            "drop[0].pattern 'ema' must be anchored with ^",
        ),
        ("components: [", "not valid YAML"),
    ],
    ids=["empty", "a-list", "unanchored-prefix", "unknown-kind", "no-kind", "duplicate", "unanchored-drop", "yaml"],
)
def test_layout_configs_that_are_refused(tmp_path, text, message):
    path = tmp_path / "layout.yaml"
    path.write_text(text)
    with pytest.raises(ConvertError) as caught:
        load_layout(str(path))
    assert str(caught.value).startswith(f"{path}: {message}")


def test_shipped_layouts_parse():
    pano, causal = load_layout("panorama_vlm"), load_layout("causal_lm")
    assert [c.name for c in pano.components] == ["vision_encoder", "resampler", "projector", "language_model"]
    assert causal.components[0].base == ("language_model_name", "model_name", "model_name_or_path", "base_model")
    assert pano.inner_wrappers == causal.inner_wrappers == ANYWHERE_WRAPPERS
