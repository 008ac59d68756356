"""The one model-card writer (``files.adapter.model_card``) for merged adapters and adapter libraries, and the one
pydantic error formatter (``_schema.first_error``): read back with huggingface_hub's own parser."""

import pytest
from huggingface_hub import ModelCard
from pydantic import BaseModel, ConfigDict, ValidationError

from peft_cp_merge._schema import first_error
from peft_cp_merge.files.adapter import model_card
from peft_cp_merge.library.library import render_card


def test_library_card_is_a_hub_model_card():
    meta = {"clusters": [{"name": "cluster_0", "size": 3, "status": "done", "previews": ["a | b"]},
                         {"name": "cluster_1", "size": 1, "status": "pending", "previews": []}],
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "embedding_model": "all-MiniLM-L6-v2",
            "plot": "clusters.png", "training": {"lora_r": 4, "seed": 0, "not_shown": 1}}
    card = ModelCard(render_card(meta))
    assert card.data.library_name == "peft" and card.data.base_model == meta["base_model"]
    assert card.data.base_model_relation == "adapter" and "tc-lora" in card.data.tags
    assert "| cluster_0 | 3 | 75.0% | done | a \\| b |" in card.text and "![clusters](clusters.png)" in card.text
    assert "lora_r: 4" in card.text and "not_shown" not in card.text


def test_model_card_without_base_model():
    card = ModelCard(model_card("\n# body\n", base_model=None, relation="merge", tags=["lora"]))
    assert card.data.base_model is None and "base_model" not in card.content and card.text.strip() == "# body"


def test_first_error_names_the_field():
    class M(BaseModel):
        model_config = ConfigDict(strict=True)
        xs: list[int]

    with pytest.raises(ValidationError) as e:
        M.model_validate({"xs": [1, "2"]})
    assert first_error(e.value) == ("xs.1", "input should be a valid integer", "2")
