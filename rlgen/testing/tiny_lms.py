"""Tiny random-weight diffusion LMs saved exactly as their Hub folders look, for tests and benchmarks.

Real LLaDA, Dream and LLaDA2 checkpoints ship their own modeling code (``auto_map`` in config.json,
loaded with ``trust_remote_code``); transformers has no class for them. So that rlgen's real loading
path runs offline, each builder here writes a small modeling file of its own (``modeling_*.py`` +
``configuration_*.py``, a pre-norm transformer with rotary positions) into the folder, next to
random weights and a byte-level BPE tokenizer trained in milliseconds:

- ``build_tiny_llada``: LLaDA layout (arXiv:2502.09992): full bidirectional attention, module names
  ``q_proj/k_proj/v_proj/attn_out/ff_proj/up_proj/ff_out``; the mask id (``<|mdm_mask|>``) is only in
  config.json (``mask_token_id``), not a tokenizer special token; no chat template (a base model).
- ``build_tiny_dream``: Dream layout (arXiv:2508.15487): bidirectional, a *remote-code tokenizer*
  (``tokenization_dream.DreamTokenizer``) with mask token ``<|mask|>`` and a chat template; its logits
  are shifted like an autoregressive model's (``logits[:, i]`` predicts token ``i + 1``), which is only a
  convention of how the weights were trained — rlgen undoes it (``shift_logits``).
- ``build_tiny_diffusion_gemma``: transformers' native DiffusionGemma (encoder-decoder block
  diffusion, uniform noise, tiny MoE text stack + a one-layer vision tower its config requires).
- ``build_tiny_llada2``: LLaDA2 layout (block diffusion): block-causal attention (a block attends to
  itself and earlier blocks), position ids, fused ``query_key_value``; the network builds the block
  pattern itself from a 2-D padding mask (``config.block_size``) or takes a 4-D mask (bool, or
  additive float as LLaDA2's own ``generate`` passes), and fills a transformers ``Cache``.

Every builder returns the folder path; ``seed`` fixes the weights and ``init_std`` their scale (the
default 0.02 gives near-uniform predictions; ~0.5 gives confident, context-dependent ones, which
decoding tests need).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# The modeling code written into each folder (one template; names substituted per layout)
# ----------------------------------------------------------------------------------------------
_CONFIG_SRC = '''"""Tiny @MODEL_TYPE@-style config (written by rlgen.testing.tiny_lms)."""
from transformers import PretrainedConfig


class @CONFIG_CLASS@(PretrainedConfig):
    model_type = "@MODEL_TYPE@"

    def __init__(self, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                 attention="bidirectional", block_size=None, qkv_names=("q_proj", "k_proj", "v_proj"),
                 out_name="o_proj", mlp_names=("gate_proj", "up_proj", "down_proj"), initializer_range=0.02,
                 mask_token_id=None, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.max_position_embeddings, self.rope_theta, self.rms_norm_eps = max_position_embeddings, rope_theta, rms_norm_eps
        self.attention, self.block_size, self.initializer_range = attention, block_size, initializer_range
        self.qkv_names, self.out_name, self.mlp_names = list(qkv_names), out_name, list(mlp_names)
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)
'''

_MODELING_SRC = '''"""Tiny @MODEL_TYPE@-style masked-diffusion LM (written by rlgen.testing.tiny_lms)."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .@CONFIG_MODULE@ import @CONFIG_CLASS@


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate(x, pos, theta):
    """Rotary embedding of x (B, H, L, D) at integer positions pos (B, L)."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos[:, None, :, None].float() * freq  # (B, 1, L, half)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        h, self.heads, self.layer_idx, self.theta = config.hidden_size, config.num_attention_heads, layer_idx, config.rope_theta
        self.qkv_names, self.out_name = config.qkv_names, config.out_name
        if len(self.qkv_names) == 1:  # fused projection (LLaDA2's query_key_value)
            setattr(self, self.qkv_names[0], nn.Linear(h, 3 * h, bias=False))
        else:
            for name in self.qkv_names:
                setattr(self, name, nn.Linear(h, h, bias=False))
        setattr(self, self.out_name, nn.Linear(h, h, bias=False))

    def forward(self, x, pos, mask, cache):
        B, L, h = x.shape
        if len(self.qkv_names) == 1:
            q, k, v = getattr(self, self.qkv_names[0])(x).chunk(3, dim=-1)
        else:
            q, k, v = (getattr(self, n)(x) for n in self.qkv_names)
        q, k, v = (t.view(B, L, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        q, k = rotate(q, pos, self.theta), rotate(k, pos, self.theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D)
        return getattr(self, self.out_name)(out.transpose(1, 2).reshape(B, L, h))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.names = config.mlp_names
        h, m = config.hidden_size, config.intermediate_size
        for name, shape in zip(self.names, [(h, m), (h, m), (m, h)]):
            setattr(self, name, nn.Linear(*shape, bias=False))

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class Layer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, pos, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), pos, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class @MODEL_CLASS@(PreTrainedModel):
    config_class = @CONFIG_CLASS@
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Layer"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _attention_mask(self, attention_mask, B, L, start, device):
        """(B, 1, L, start + L): bool (True = attend) or an additive float mask, as SDPA takes."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        K = start + L
        keys = torch.ones(B, K, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        allow = keys[:, None, None, :].expand(B, 1, L, K)
        q_pos = torch.arange(start, K, device=device)
        if self.config.attention == "block_causal":
            bs = self.config.block_size
            allow = allow & ((torch.arange(K, device=device) // bs)[None, :] <= (q_pos // bs)[:, None])
        # a query always sees itself, so a padded query never has an empty softmax
        return allow | (torch.arange(K, device=device)[None, :] == q_pos[:, None])

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, return_dict=True, **kwargs):
        B, L = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=input_ids.device).expand(B, L)
        mask = self._attention_mask(attention_mask, B, L, start, input_ids.device)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, position_ids, mask, past_key_values)
        logits = self.lm_head(self.norm(h))
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)
'''

_TOKENIZER_SRC = '''"""Dream-style tokenizer class shipped as remote code (written by rlgen.testing.tiny_lms)."""
from transformers import PreTrainedTokenizerFast


class DreamTokenizer(PreTrainedTokenizerFast):
    """A byte-level BPE read from tokenizer.json; exists so the folder needs trust_remote_code."""
'''

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LAYOUTS = {
    "llada": dict(model_type="llada", config_module="configuration_llada", config_class="LLaDAConfig",
                  modeling_module="modeling_llada", model_class="LLaDAModelLM",
                  auto=("AutoModel", "AutoModelForCausalLM"), attention="bidirectional",
                  qkv_names=["q_proj", "k_proj", "v_proj"], out_name="attn_out",
                  mlp_names=["ff_proj", "up_proj", "ff_out"]),
    "dream": dict(model_type="Dream", config_module="configuration_dream", config_class="DreamConfig",
                  modeling_module="modeling_dream", model_class="DreamModel", auto=("AutoModel",),
                  attention="bidirectional", qkv_names=["q_proj", "k_proj", "v_proj"], out_name="o_proj",
                  mlp_names=["gate_proj", "up_proj", "down_proj"]),
    "llada2": dict(model_type="llada2_moe", config_module="configuration_llada2_moe",
                   config_class="LLaDA2MoeConfig", modeling_module="modeling_llada2_moe",
                   model_class="LLaDA2MoeModelLM", auto=("AutoModel", "AutoModelForCausalLM"),
                   attention="block_causal", qkv_names=["query_key_value"], out_name="dense",
                   mlp_names=["gate_proj", "up_proj", "down_proj"]),
}

# A little text in the formats the tiny models see (rlgen's tasks, math answers, chat markup), so
# the BPE learns a few useful merges; any other text still encodes, byte by byte.
_CORPUS = [
    "047+085=231", "12-47=53-", "23*8=481", "numbers: 3 7 9 target: 30 answer: (9-7)*3*5",
    "The answer is 42. #### 42", "So the final answer is \\boxed{17}.", "<think>let me add</think> 12",
    "def add(a, b):\n    return a + b\n", "Question: Tom has 3 apples and buys 4 more. How many?",
    "assistant user system", "0123456789 + - * / = ( ) . , : ; ? !",
]


def build_bpe_tokenizer(special_tokens: list[str], vocab_size: int = 384, *, eos: str = "<|endoftext|>",
                        pad: str | None = None, mask: str | None = None, chat_template: str | None = None):
    """A byte-level BPE (every string encodes) with ``special_tokens`` first; a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    kw = dict(eos_token=eos, pad_token=pad or eos)
    if mask is not None:
        kw["mask_token"] = mask
    tok = PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False, **kw)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def _write_code(path: Path, layout: dict) -> None:
    subs = {"@MODEL_TYPE@": layout["model_type"], "@CONFIG_CLASS@": layout["config_class"],
            "@CONFIG_MODULE@": layout["config_module"], "@MODEL_CLASS@": layout["model_class"]}
    for name, src in ((layout["config_module"], _CONFIG_SRC), (layout["modeling_module"], _MODELING_SRC)):
        for key, value in subs.items():
            src = src.replace(key, value)
        (path / f"{name}.py").write_text(src)


def _build(path, kind: str, tokenizer, *, seed: int, hidden_size: int, num_layers: int, num_heads: int,
           intermediate_size: int, max_length: int, init_std: float, config_extra: dict) -> Path:
    """Write code + config.json, build the model through the real remote-code path, save weights."""
    import rlgen  # noqa: F401  (its torchvision step must precede transformers' model classes)
    from transformers import AutoConfig, AutoModel

    from rlgen.models import quiet_hf_progress

    layout = LAYOUTS[kind]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_code(path, layout)
    auto_map = {"AutoConfig": f"{layout['config_module']}.{layout['config_class']}"}
    auto_map.update({key: f"{layout['modeling_module']}.{layout['model_class']}" for key in layout["auto"]})
    config = {"model_type": layout["model_type"], "architectures": [layout["model_class"]], "auto_map": auto_map,
              "vocab_size": len(tokenizer), "hidden_size": hidden_size, "num_hidden_layers": num_layers,
              "num_attention_heads": num_heads, "intermediate_size": intermediate_size,
              "max_position_embeddings": max_length, "attention": layout["attention"],
              "qkv_names": layout["qkv_names"], "out_name": layout["out_name"], "mlp_names": layout["mlp_names"],
              "initializer_range": init_std, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, **config_extra}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=True, local_files_only=True)
    torch.manual_seed(seed)
    net = AutoModel.from_config(cfg, trust_remote_code=True)
    with quiet_hf_progress():
        net.save_pretrained(str(path))  # config.json (auto_map kept) + model.safetensors + the code files
    tokenizer.save_pretrained(str(path))
    return path


def build_tiny_llada(path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int = 128, max_length: int = 256, init_std: float = 0.02) -> Path:
    """LLaDA layout: remote code, bidirectional, mask id only in config.json (``mask_token_id``)."""
    tok = build_bpe_tokenizer(["<|endoftext|>", "<|mdm_mask|>"])  # the mask is a token, not *the* mask token
    extra = {"mask_token_id": tok.convert_tokens_to_ids("<|mdm_mask|>")}
    return _build(path, "llada", tok, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                  num_heads=num_heads, intermediate_size=intermediate_size, max_length=max_length,
                  init_std=init_std, config_extra=extra)


def build_tiny_dream(path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int = 128, max_length: int = 256, init_std: float = 0.02) -> Path:
    """Dream layout: remote-code model *and* tokenizer (``<|mask|>``, chat template), shifted logits."""
    tok = build_bpe_tokenizer(["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"], mask="<|mask|>",
                              chat_template=CHATML_TEMPLATE)
    path = _build(path, "dream", tok, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                  num_heads=num_heads, intermediate_size=intermediate_size, max_length=max_length, init_std=init_std,
                  config_extra={})
    (path / "tokenization_dream.py").write_text(_TOKENIZER_SRC)
    cfg_path = path / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "DreamTokenizer"
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return path


def build_tiny_llada2(path, seed: int = 0, block_size: int = 4, hidden_size: int = 64, num_layers: int = 2,
                      num_heads: int = 4, intermediate_size: int = 128, max_length: int = 256,
                      init_std: float = 0.02, tokenizer=None) -> Path:
    """LLaDA2 layout: remote code, block-causal attention over ``block_size`` blocks, ``<|mask|>``.

    ``tokenizer`` replaces the BPE (e.g. rlgen's character tokenizer for a model trained on its tasks);
    it must have a mask token.
    """
    tok = tokenizer or build_bpe_tokenizer(["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"],
                                           mask="<|mask|>", chat_template=CHATML_TEMPLATE)
    extra = {"block_size": block_size, "mask_token_id": tok.mask_token_id}
    return _build(path, "llada2", tok, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                  num_heads=num_heads, intermediate_size=intermediate_size, max_length=max_length,
                  init_std=init_std, config_extra=extra)


def build_tiny_diffusion_gemma(path, seed: int = 0, canvas_length: int = 8, hidden_size: int = 64,
                               num_layers: int = 2, tokenizer=None) -> Path:
    """A tiny ``DiffusionGemmaForBlockDiffusion`` folder (native class, no remote code) + a BPE tokenizer.

    ``tokenizer`` replaces the BPE (e.g. a masked-LM student's, so the model can be its OPD teacher)."""
    import rlgen  # noqa: F401
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from rlgen.models import quiet_hf_progress

    tok = tokenizer or build_bpe_tokenizer(["<pad>", "<eos>", "<bos>", "<|im_start|>", "<|im_end|>"], eos="<eos>",
                                           pad="<pad>", chat_template=CHATML_TEMPLATE)
    vocab = len(tok) + 3  # + the image markers the multimodal config names
    text = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                global_head_dim=16, max_position_embeddings=512, sliding_window=64,
                layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"], num_experts=4,
                top_k_experts=2, moe_intermediate_size=hidden_size, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.convert_tokens_to_ids("<bos>")
                if "<bos>" in tok.get_vocab() else tok.eos_token_id)
    vision = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length,
                               boi_token_id=vocab - 3, eoi_token_id=vocab - 2, image_token_id=vocab - 1)
    torch.manual_seed(seed)
    net = DiffusionGemmaForBlockDiffusion(cfg)
    path = Path(path)
    with quiet_hf_progress():
        net.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
