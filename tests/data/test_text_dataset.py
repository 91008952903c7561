"""Real text datasets: files / `datasets` folders / Hub ids, chat templates, columns to rewards, and
trl's own reward functions running unchanged through rlgen's reward API."""
import json

import pytest
import torch

import rlgen  # noqa: F401

from rewards.base import RewardMixer
from rlgen.data.text_dataset import (TextDataError, TextDatasetConfig, check_reward_columns, load_text_dataset,
                                     tokenize_prompts)
from rlgen.testing.tiny_lms import CHATML_TEMPLATE, build_bpe_tokenizer

ROWS = [{"question": "What is 1 + 2?", "solution": "3", "level": "easy"},
        {"question": "What is 3 * 4?", "solution": "12", "level": "easy"},
        {"question": "Half of 1?", "solution": "\\frac{1}{2}", "level": "hard"}]


@pytest.fixture(scope="module")
def chat_tok():
    return build_bpe_tokenizer(["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"], mask="<|mask|>",
                               chat_template=CHATML_TEMPLATE)


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "math.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def test_chat_template_renders_prompts_and_columns_reach_rewards(jsonl, chat_tok):
    cfg = TextDatasetConfig(path=str(jsonl), prompt_column="question", chat_template=True,
                            system_prompt="Think, then answer.", gen_length=64)
    ds = load_text_dataset(cfg, chat_tok)
    # ChatML written out by hand: system turn, user turn, then the assistant's turn opens
    assert ds.items[0]["prompt"] == ("<|im_start|>system\nThink, then answer.<|im_end|>\n"
                                     "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert ds.columns == ["solution", "level"] and ds.gen_length == 64 and ds.chat
    assert ds.reward_kwargs(ds.items[1:]) == {"solution": ["12", "\\frac{1}{2}"], "level": ["easy", "hard"]}
    assert ds.completions(["hi"]) == [[{"role": "assistant", "content": "hi"}]]


def test_trl_rewards_work_unchanged_through_the_mixer(jsonl, chat_tok):
    ds = load_text_dataset(TextDatasetConfig(path=str(jsonl), prompt_column="question", chat_template=True), chat_tok)
    texts = ["<think>1 plus 2</think> The answer is $\\boxed{3}$.",   # right, well formatted
             "The answer is $\\boxed{13}$.",                          # wrong, no think block
             "<think>half</think> $\\boxed{\\frac{1}{2}}$"]           # right, well formatted
    mixer = RewardMixer({"rewards": {"trl.rewards:accuracy_reward": 1.0, "trl.rewards:think_format_reward": 0.5}})
    check_reward_columns(mixer.rewards, ds)  # accuracy_reward needs `solution`: present
    out = mixer(ds.completions(texts), [it["prompt"] for it in ds.items], **ds.reward_kwargs(ds.items))
    assert out.components["trl.rewards:accuracy_reward"].tolist() == [1.0, 0.0, 1.0]
    assert out.components["trl.rewards:think_format_reward"].tolist() == [1.0, 0.0, 1.0]
    assert out.total.tolist() == [1.5, 0.0, 1.5]


def test_reward_needing_a_missing_column_is_named(tmp_path, chat_tok):
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in ROWS))
    ds = load_text_dataset(TextDatasetConfig(path=str(p), prompt_column="question"))
    for name in ("trl.rewards:accuracy_reward", "math_answer"):
        mixer = RewardMixer({name: 1.0})
        with pytest.raises(TextDataError, match=rf"reward '{name}' needs column .*'solution'.*lacks"):
            check_reward_columns(mixer.rewards, ds)


def test_tokenizer_without_chat_template_is_one_clear_error(jsonl):
    plain = build_bpe_tokenizer(["<|endoftext|>"])
    with pytest.raises(TextDataError,
                       match="prompts.dataset.chat_template=true, but the tokenizer .* has no chat template"):
        load_text_dataset(TextDatasetConfig(path=str(jsonl), prompt_column="question", chat_template=True), plain)


def test_parquet_datasets_folder_and_jsonl_agree(jsonl, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "math.parquet")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    kw = dict(prompt_column="question", prompt_template="Q: {question}\nA:", columns=["solution"])
    items = [load_text_dataset(TextDatasetConfig(path=str(p), split="test", **kw)).items
             for p in (jsonl, tmp_path / "math.parquet", tmp_path / "saved")]
    assert items[0] == items[1] == items[2]
    assert items[0][0] == {"prompt": "Q: What is 1 + 2?\nA:", "solution": "3"}
    with pytest.raises(TextDataError, match=r"no split 'train' \(splits: \['test'\]\)"):
        load_text_dataset(TextDatasetConfig(path=str(tmp_path / "saved"), **kw))


def test_bad_inputs_name_where(tmp_path, monkeypatch):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "a"}\nnot json\n')
    with pytest.raises(TextDataError, match=r"bad.jsonl:2: invalid JSON"):
        load_text_dataset(TextDatasetConfig(path=str(p), prompt_column="question"))
    p.write_text('{"q": "a"}\n')
    with pytest.raises(TextDataError,
                       match=r"no prompt column 'question' \(columns: \['q'\]\); set prompts.dataset.prompt_column="):
        load_text_dataset(TextDatasetConfig(path=str(p), prompt_column="question"))
    p.write_text('{"question": "a", "completions": "x"}\n')
    with pytest.raises(TextDataError, match=r"column\(s\) \['completions'\] would collide"):
        load_text_dataset(TextDatasetConfig(path=str(p), prompt_column="question"))
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds_cache")
    with pytest.raises(TextDataError,
                       match=r"prompts.dataset.path 'acme/no-such-math': cannot load this Hub dataset id"):
        load_text_dataset(TextDatasetConfig(path="acme/no-such-math", prompt_column="question"))


def test_tokenize_prompts_left_pads(chat_tok):
    ids, mask = tokenize_prompts(chat_tok, ["12", "1 + 2 = 3"], pad_id=0)
    a, b = (chat_tok(t, add_special_tokens=False)["input_ids"] for t in ("12", "1 + 2 = 3"))
    assert ids.shape == (2, len(b)) and ids[1].tolist() == b
    assert ids[0, -len(a):].tolist() == a and (ids[0, :-len(a)] == 0).all()
    assert mask.sum(1).tolist() == [len(a), len(b)] and torch.equal(mask[0, -len(a):], torch.ones(len(a), dtype=torch.long))
