"""The converted folder's model card: Hugging Face front matter, the plan, the cache, provenance, the input card."""

from __future__ import annotations

import copy
import json

import yaml
from helpers import ROOT

from hydracc.emit.model_card import build_model_card, split_card

HYDRA = {
    "format_version": 1,
    "layers": [
        {"layer": 0, "module": "model.layers.0.self_attn", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "scale": 0.35,
         "kinds": ["full", "full", "gdn", "gdn"], "head_order": [2, 3, 0, 1], "head_windows": [],
         "params": [f"model.layers.0.self_attn.hydra.{n}" for n in ("fusion_scale", "hedgehog_weight", "hedgehog_bias", "gdn_gate_weight", "gdn_gate_bias")]},
        {"layer": 1, "module": "model.layers.1.self_attn", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "scale": 0.35,
         "kinds": ["streaming"] * 4, "head_order": [0, 1, 2, 3], "head_windows": [4, 64] * 4, "params": []},
    ],
    "plan": {"unit": "kv_group", "budget": {"strategy": "heads", "score": "sensitivity", "full_ratio": 0.25, "full_units": 1, "total_units": 4},
             "layers": [{"layer": 0, "num_heads": 4, "num_kv_heads": 2, "heads": [{"kind": "gdn"}, {"kind": "gdn"}, {"kind": "full", "scores": {"sensitivity": 0.5}},
                                               {"kind": "full", "scores": {"sensitivity": 0.5}}]},
                        {"layer": 1, "num_heads": 4, "num_kv_heads": 2, "heads": [{"kind": "streaming"}] * 4}]},
    "passes": ["fold-gqa", "hybridize", "permute-heads"],
    "distill": {"settings": {"steps": 200, "lr": 0.01}, "losses": {"attention_transfer.layer0": [0.9, 0.1]}},
    "provenance": {"hydracc_version": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0", "inputs": {"model.safetensors": "ab" * 32}},
}
CONFIG = {"model_type": "qwen3", "hydra": HYDRA}
SIZES = {"kv_bytes_per_token_before": 2048, "kv_bytes_per_token_after": 256, "state_bytes_per_sequence": 9000}


def _front(card: str) -> dict:
    meta, _ = split_card(card)
    assert meta, card[:200]
    return meta


def test_front_matter_and_sections() -> None:
    card = build_model_card(CONFIG, **SIZES, base_model="org/base-1.7B")
    meta = _front(card)
    assert meta == {"base_model": ["org/base-1.7B"], "library_name": "transformers",
                    "tags": ["hydracc", "hybrid-attention", "gdn-attention", "streaming-attention"]}
    for text in ("| 0 | `model.layers.0.self_attn` | full full gdn gdn | 2 | 2 | 1/2 |",
                 "| 1 | `model.layers.1.self_attn` | streaming streaming streaming streaming | 0 | 4 | 0/2 |",
                 "KV cache per token: 2.0 KiB before, 256 B after (12.5%)", "- `gdn`: gated delta rule",
                 "Strategy heads by `sensitivity`, full ratio 0.25: 1 of 4 KV groups kept full.", "| 0.2 | 0.5 |",
                 "attention_transfer.layer0: loss 0.9000 -> 0.1000", "import hydracc", "AutoModelForCausalLM.from_pretrained",
                 "| model.safetensors | `" + "ab" * 32 + "` |"):
        assert text in card, text
    assert build_model_card(copy.deepcopy(CONFIG), **SIZES, base_model="org/base-1.7B") == card  # deterministic


def test_the_input_card_is_kept_and_its_fields_carried_up() -> None:
    original = "---\nlicense: apache-2.0\nbase_model: Qwen/Qwen3-1.7B\nlanguage: [en]\n---\n# Qwen3\n\nSome text: keep me.\n"
    card = build_model_card(CONFIG, **SIZES, input_card=original)
    meta = _front(card)
    assert meta["base_model"] == ["Qwen/Qwen3-1.7B"] and meta["license"] == "apache-2.0"
    assert card.rstrip().endswith("## Original model card\n\n# Qwen3\n\nSome text: keep me.")
    assert card.count("---\n") == 2  # the input's front matter is not repeated below
    # --base-model wins over the input card's
    assert _front(build_model_card(CONFIG, **SIZES, input_card=original, base_model="me/other"))["base_model"] == ["me/other"]


def test_odd_input_cards() -> None:
    for text in ("no front matter at all\n", "---\n: : not yaml [\n---\nbody\n", "---\n- a list\n---\nbody\n", ""):
        card = build_model_card(CONFIG, **SIZES, input_card=text)
        assert _front(card)["library_name"] == "transformers"
    hostile = '---\nlicense: "x\\ny"\nbase_model: "a\\"b"\n---\n'
    meta = _front(build_model_card(CONFIG, **SIZES, input_card=hostile))
    assert meta["license"] == "x\ny" and meta["base_model"] == ['a"b']


def test_card_of_a_real_conversion(tmp_path) -> None:
    config = json.loads((ROOT / "examples" / "tiny-llama" / "config.json").read_text())
    config["hydra"] = {**HYDRA, "plan": None, "distill": {"settings": None, "losses": {}}}
    card = build_model_card(config, **SIZES, input_card=(ROOT / "examples" / "tiny-llama" / "README.md").read_text())
    assert "Converted by a plan file given by hand." in card and "Measured initial values" in card
    assert "# tiny-llama: the hydracc example model" in card
    yaml.safe_load(card.split("---\n")[1])


def test_the_card_names_the_objective_and_what_decided() -> None:
    config = copy.deepcopy(CONFIG)
    budget = config["hydra"]["plan"]["budget"]
    budget.update(objective="recall", full_decided_by={"joint": ["0.1"]})
    for head in config["hydra"]["plan"]["layers"][0]["heads"][2:]:
        head["scores"]["recall"] = 0.25
    card = build_model_card(config, **SIZES)
    for text in ("Objective `recall` (recall first, then output KL).", "Full units decided by: `joint` (0.1) (each KV group named by its first query head, layer.head).",
                 "| layer.head (original order) | recall | sensitivity |", "| 0.2 | 0.25 | 0.5 |"):
        assert text in card, text
    budget["objective_fell_back_to_kl"] = True
    assert "failed its recall probes, so output KL decided" in build_model_card(config, **SIZES)
