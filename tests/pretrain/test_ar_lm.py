"""The autoregressive teacher trainer: the answer-only loss against cross-entropy written out by
hand, greedy decoding against a model whose next token is known, and a tiny end-to-end run whose
checkpoint is a plain Hugging Face folder with rlgen's character tokenizer."""
import math

import pytest
import torch

import rlgen  # noqa: F401
from rlgen.pretrain.ar_lm import answer_loss, greedy_answers


def test_answer_loss_is_cross_entropy_of_the_answer_tokens_only():
    V = 5
    logits = torch.randn(2, 4, V)
    seqs = torch.tensor([[1, 2, 3, 4], [0, 4, 2, 1]])
    P = 2  # answer = positions 2, 3, predicted by positions 1, 2
    want = []
    for b in range(2):
        for t in (2, 3):
            lp = torch.log_softmax(logits[b, t - 1], -1)
            want.append(-lp[seqs[b, t]])
    assert answer_loss(logits, seqs, P).item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-6)
    # raw text (no prompt): every token after the first is a target
    full = [-torch.log_softmax(logits[b, t - 1], -1)[seqs[b, t]] for b in range(2) for t in (1, 2, 3)]
    assert answer_loss(logits, seqs, 0).item() == pytest.approx(torch.stack(full).mean().item(), rel=1e-6)


class _Next(torch.nn.Module):
    """Predicts token (last + 1) mod V, but scores [PAD]/[MASK] (ids 0, 1) highest of all."""

    def __init__(self, V):
        super().__init__()
        self.V, self.device = V, torch.device("cpu")

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.V)
        nxt = (x + 1) % self.V
        logits.scatter_(-1, nxt[..., None], 5.0)
        logits[..., :2] = 10.0  # must never be chosen
        return type("Out", (), {"logits": logits})()


def test_greedy_answers_follow_the_argmax_and_never_emit_pad_or_mask():
    from rlgen.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    V = len(tok)
    prompt = torch.tensor(tok.encode("12+"))[None]  # (1, 3)
    got = greedy_answers(_Next(V), tok, prompt, 3)
    last = prompt[0, -1].item()
    want = tok.decode([(last + k) % V for k in (1, 2, 3)])
    assert got == [want]


@pytest.mark.usefixtures("one_thread")
def test_tiny_run_writes_a_loadable_hf_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlgen.config import load_config
    from rlgen.pretrain.ar_lm import train

    cfg = load_config("configs/pretrain/ar_arith.yaml",
                      [f"run.root={tmp_path}", "run.name=ar", "run.progress=false", "run.tensorboard=false",
                       "train.max_steps=20", "train.eval_every=0", "train.checkpoint_every=0", "data.num_train=500",
                       "data.eval_n_per_level=4", "model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=1",
                       "model.intermediate_size=64"])
    run = train(cfg)
    ckpt = run / "checkpoints" / "20"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.encode("47+85=") == [tok.convert_tokens_to_ids(c) for c in "47+85="]  # the character ids
    assert model.config.vocab_size == len(tok)
    from rlgen.runtime.rundir import read_metrics

    rows = read_metrics(run)
    assert rows[0]["loss"] < math.log(len(tok)) + 0.5 and "eval_accuracy" in rows[-1]
