import json

import pytest

from dflash_sglang.prompts import PROMPT_SETS, load_prompt_set, parse_jsonl
from dflash_sglang.regenerate import read_prompts
from dflash_sglang.train import load_sequences


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


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """A prompt holding U+2028 unescaped (json.dumps(ensure_ascii=False) writes it so) is one record, in the prompt
    files `regenerate` reads and in the training data."""
    rows = [{"prompt": "first\u2028same prompt\x85still"}, {"prompt": "second"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n")
    assert len(path.read_text().splitlines()) == 5  # what str.splitlines() would have parsed
    assert parse_jsonl(path.read_text()) == rows
    assert read_prompts(path) == [r["prompt"] for r in rows]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt_ids": [1, 2], "output_ids": [3], "note": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert [s.ids.tolist() for s in load_sequences(data, 16)] == [[1, 2, 3]]
