"""A tiny Llama (model + byte-level BPE tokenizer) built offline, for tests and demos of the vLLM path.

No model hub is reachable in CI, so the autoregressive models that vLLM serves in tests are built
here from a config and saved in the usual HF layout (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json). Everything is a pure function of ``seed``: the same seed
gives the same folder contents, so expected values can be recomputed with transformers.

The tokenizer is trained on a small synthetic corpus whose words include "yes" and "no", so that
" yes" and " no" are single tokens (the LLM-judge reward needs that); the builder checks it.
"""
from __future__ import annotations

import random
from pathlib import Path

import rlgen  # noqa: F401  (patches torchvision before transformers' model classes import it)

# Words of the synthetic corpus. Frequent enough that the BPE merges each into one token with its
# leading space (byte-level "Ġyes"), which is how real LLM tokenizers hold common words.
WORDS = ("yes no good bad answer question is the a response prompt image of red blue green circle "
         "square triangle cat dog sum two three four five correct wrong does match").split()
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def build_tokenizer(seed: int = 0, vocab_size: int = 384):
    """A byte-level BPE trained in milliseconds on a synthetic corpus; returns a HF fast tokenizer.

    Nothing is added around encoded text (no BOS): ids in tests are exactly the text's tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    lines += ["Answer: yes", "Answer: no"] * 50 + ["0 1 2 3 4 5 6 7 8 9 + - = ? . , :"] * 10
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(lines, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  clean_up_tokenization_spaces=False)
    for word in (" yes", " no"):
        if len(tok.encode(word)) != 1:
            raise RuntimeError(f"tiny tokenizer: {word!r} is not a single token; enlarge vocab_size or the corpus")
    return tok


def build_tiny_llama(path: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     init_std: float = 0.3, vocab_size: int = 384, tokenizer=None) -> Path:
    """Save a random LlamaForCausalLM (float32) and its tokenizer into ``path``; returns the path.

    ``init_std`` is much larger than Llama's 0.02 on purpose: near-uniform next-token distributions
    would let an off-by-one position or a stale weight pass a 1e-4 log-prob comparison.
    Head size 32 (hidden 64, 2 heads, 1 KV head: grouped-query attention is exercised) is one of
    the sizes vLLM's CPU attention supports. ``tokenizer``: save this one (e.g. rlgen's character
    tokenizer, for an autoregressive teacher that shares a masked-diffusion student's ids) instead
    of the synthetic BPE.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = build_tokenizer(seed, vocab_size) if tokenizer is None else tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
                      max_position_embeddings=512, initializer_range=init_std, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, torch_dtype="float32")
    # Seed only a private generator's worth of global state: save and restore the caller's RNG.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float().eval()
    finally:
        torch.random.set_rng_state(state)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
