"""Real text data for RL on language models: prompts (and answer columns) from files or `datasets`.

A dataset is a table with a prompt column and any other columns (a reference ``solution``, unit
``tests`` …). ``load_text_dataset(cfg, tokenizer)`` turns each row into a prompt *item*::

    {"prompt": <the text fed to the model>, **other columns}

With ``chat_template`` the prompt column is wrapped as a user message (after an optional system
message) and rendered with the tokenizer's chat template, as instruct models were trained; the
model's completion is then a conversation turn, so rewards receive completions in trl's
conversational form, ``[{"role": "assistant", "content": text}]``. The other columns reach rewards
as keyword arguments, one list aligned with the completions (trl's ``reward_funcs`` convention), so
``trl.rewards.accuracy_reward`` (needs ``solution``) and ``think_format_reward`` work unchanged::

    ds = load_text_dataset(TextDatasetConfig(path="gsm8k.jsonl", prompt_column="question",
                                             chat_template=True), tokenizer)
    items = ds.items[:8]                       # what rollouts decode
    completions = ds.completions(texts)        # conversational when the template is used
    mixer(completions, [it["prompt"] for it in items], **ds.reward_kwargs(items))

Sources: a JSONL / JSON / parquet / CSV file, a folder written by ``datasets.save_to_disk``, a folder
of data files, or a Hub dataset id (``datasets`` cache first; offline, a one-line error names it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

RESERVED = ("prompt", "prompts", "completions", "samples", "completion_ids", "messages", "gen_length")


class TextDataError(ValueError):
    """Bad data or config; the message names the file (and row) or the config key."""


@dataclass
class TextDatasetConfig:
    """``prompts.dataset:`` of a text RL job (``prompts.source: dataset``): the rows prompts come from."""

    path: str = ""  # file, folder, or Hub dataset id (required)
    split: str = "train"
    name: str | None = None  # a Hub dataset's configuration (e.g. gsm8k's "main")
    prompt_column: str = "prompt"
    prompt_template: str | None = None  # e.g. "{question}\nAnswer:" (str.format over the row); None: the column
    columns: list[str] | None = None  # columns passed to rewards; None: every other column
    chat_template: bool = False  # render prompts with the tokenizer's chat template (instruct models)
    system_prompt: str | None = None
    gen_length: int = 256  # answer tokens decoded per item
    limit: int | None = None  # first N rows only

    def __post_init__(self):
        from rlgen.config import FieldError

        if self.gen_length <= 0:
            raise FieldError("gen_length", f"must be > 0, got {self.gen_length}")
        if self.limit is not None and self.limit <= 0:
            raise FieldError("limit", f"must be > 0, got {self.limit}")


@dataclass
class TextDataset:
    items: list[dict]  # {"prompt": text, **columns}
    columns: list[str]  # the columns that reach rewards
    chat: bool  # completions are conversational
    gen_length: int
    source: str = ""
    messages: list[list[dict]] = field(default_factory=list)  # the chat messages behind each prompt (chat only)

    def __len__(self) -> int:
        return len(self.items)

    def reward_kwargs(self, items: Sequence[dict]) -> dict[str, list]:
        """trl's convention: each column as a list aligned with the batch's completions."""
        return {c: [it[c] for it in items] for c in self.columns}

    def completions(self, texts: Sequence[str]) -> list:
        """Decoded answers → what rewards get: conversational turns under a chat template, else text."""
        if self.chat:
            return [[{"role": "assistant", "content": t}] for t in texts]
        return list(texts)


# ----------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    from rlgen.utils import TextFileError, read_text_file

    try:
        text = read_text_file(path)
    except TextFileError as e:
        raise TextDataError(str(e)) from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TextDataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TextDataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise TextDataError(f"{path}: a .json dataset must be a list of objects")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        import csv

        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    raise TextDataError(f"{path}: unknown data file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")


def _read_datasets(spec: str, split: str, name: str | None) -> list[dict]:
    """A `datasets` folder (save_to_disk), a folder of data files, or a Hub id (cache first)."""
    import datasets

    p = Path(spec)
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise TextDataError(f"{p}: no split {split!r} (splits: {sorted(ds)}); set prompts.dataset.split=")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(spec, name, split=split)
    except TextDataError:
        raise
    except Exception as e:  # offline misses raise ConnectionError, FileNotFoundError, DatasetNotFoundError …
        where = "folder" if p.exists() else "Hub dataset id"
        raise TextDataError(f"prompts.dataset.path {spec!r}: cannot load this {where} (split {split!r}): not a "
                            f"readable local dataset and not in the local datasets cache (offline?): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return [dict(r) for r in ds]


def read_rows(cfg: TextDatasetConfig) -> list[dict]:
    if not cfg.path:
        raise TextDataError("prompts.dataset.path is required (a JSONL/parquet file, a datasets folder or a Hub id)")
    p = Path(cfg.path).expanduser()
    rows = _read_file(p) if p.is_file() else _read_datasets(cfg.path, cfg.split, cfg.name)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    if not rows:
        raise TextDataError(f"prompts.dataset.path {cfg.path!r}: no rows")
    return rows


# ----------------------------------------------------------------------------------------------
# Rows → prompt items
# ----------------------------------------------------------------------------------------------
def _prompt_text(cfg: TextDatasetConfig, row: dict, i: int) -> str:
    if cfg.prompt_template is not None:
        try:
            return cfg.prompt_template.format(**row)
        except KeyError as e:
            raise TextDataError(f"{cfg.path}: row {i}: prompts.dataset.prompt_template names column "
                                f"{e.args[0]!r}, which the row lacks (columns: {sorted(row)})") from None
    value = row.get(cfg.prompt_column)
    if not isinstance(value, str):
        raise TextDataError(f"{cfg.path}: row {i}: prompt column {cfg.prompt_column!r} must hold text, "
                            f"got {type(value).__name__}")
    return value


def chat_messages(cfg: TextDatasetConfig, text: str) -> list[dict]:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return messages + [{"role": "user", "content": text}]


def apply_chat_template(tokenizer, messages: list[dict]) -> str:
    """The instruct model's own rendering of ``messages``, ending where the assistant's turn begins."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TextDataError(f"prompts.dataset.chat_template=true, but the tokenizer of {name!r} has no chat template "
                            f"(a base model?); set prompts.dataset.chat_template=false or use an instruct model")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_text_dataset(cfg: TextDatasetConfig, tokenizer=None, *, render_chat: bool = True) -> TextDataset:
    """Rows → prompt items (see the module docstring); every problem is named with file and row.

    ``render_chat=False`` leaves chat prompts unrendered: each item then carries its ``messages`` and
    the holder of the policy's tokenizer renders them (``apply_chat_template``; a training job's
    rollout workers do, so the driver never loads the tokenizer's code).
    """
    rows = read_rows(cfg)
    if cfg.prompt_template is None and cfg.prompt_column not in rows[0]:
        raise TextDataError(f"prompts.dataset.path {cfg.path!r} has no prompt column {cfg.prompt_column!r} "
                            f"(columns: {sorted(rows[0])}); set prompts.dataset.prompt_column=")
    if cfg.chat_template and render_chat and tokenizer is None:
        raise TextDataError("prompts.dataset.chat_template=true needs the policy's tokenizer")
    columns = cfg.columns if cfg.columns is not None else [c for c in rows[0] if c != cfg.prompt_column]
    clash = sorted(set(columns) & set(RESERVED))
    if clash:
        raise TextDataError(f"prompts.dataset.path {cfg.path!r}: column(s) {clash} would collide with reward "
                            f"arguments; rename them or leave them out of prompts.dataset.columns")
    items, messages = [], []
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise TextDataError(f"{cfg.path}: row {i} lacks column(s) {missing}")
        text = _prompt_text(cfg, row, i)
        item = {c: row[c] for c in columns}
        if cfg.chat_template:
            messages.append(chat_messages(cfg, text))
            if render_chat:
                text = apply_chat_template(tokenizer, messages[-1])
            else:
                item["messages"] = messages[-1]
        elif cfg.system_prompt:
            text = f"{cfg.system_prompt}\n\n{text}"
        items.append({"prompt": text, **item})
    return TextDataset(items, list(columns), cfg.chat_template, cfg.gen_length, cfg.path, messages)


def tokenize_prompts(tokenizer, texts: Sequence[str], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt texts → (ids (B, P), attention_mask (B, P)), left-padded so every answer starts at P.

    No special tokens are added: a chat template already wrote its own, and a base model's prompt is
    taken as written.
    """
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    P = max(len(x) for x in ids)
    out = torch.full((len(ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), P, dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            out[i, P - len(x):] = torch.tensor(x)
            mask[i, P - len(x):] = 1
    return out.to(device), mask.to(device)


def check_reward_columns(rewards: dict[str, Any], dataset: TextDataset, provided: Sequence[str] = ()) -> None:
    """Fail before any rollout when a reward needs a column the data lacks (names both).

    ``rewards``: name → callable (e.g. ``RewardMixer.rewards``); ``provided``: extra keyword
    arguments the runtime passes itself (e.g. ``problems``).
    """
    from rewards.base import columns_needed

    check_columns({name: columns_needed(getattr(fn, "fn", fn)) for name, fn in rewards.items()}, dataset, provided)


def check_columns(needs: dict[str, list], dataset: TextDataset, provided: Sequence[str] = ()) -> None:
    """``needs``: reward name → the columns it needs (a name, or a tuple of alternatives)."""
    have = set(dataset.columns) | set(provided)
    for name, wanted_list in needs.items():
        for need in wanted_list:
            options = (need,) if isinstance(need, str) else tuple(need)
            if not have & set(options):
                wanted = " or ".join(repr(o) for o in options)
                raise TextDataError(f"reward '{name}' needs column {wanted}, which prompts.dataset.path "
                                    f"{dataset.source!r} lacks (columns: {sorted(dataset.columns)})")
