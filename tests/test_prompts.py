import pytest

from dflash_sglang.prompts import PROMPT_SETS, load_prompt_set


@pytest.mark.parametrize("name,count", [("math500", 311), ("humaneval", 164), ("mtbench", 80), ("gsm8k", 200)])
def test_prompt_sets_ship_whole(name, count):
    rows = load_prompt_set(name)
    assert len(rows) == count and len({r["id"] for r in rows}) == count
    assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in rows)
    assert load_prompt_set(name, limit=5) == rows[:5]


def test_unknown_set_is_refused():
    with pytest.raises(ValueError, match="must be one of"):
        load_prompt_set("alpaca")
    assert set(PROMPT_SETS) == {"math500", "humaneval", "mtbench", "gsm8k"}
