"""Aesthetic head: LAION's state-dict layout loads and computes LAION's forward; Bradley–Terry
training recovers a known preference; the reward and the file trainer end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewards.aesthetic import AestheticHead, AestheticReward, load_head, save_head
from rlgen.config import load_config
from rlgen.data import shapes as S
from rlgen.pretrain.aesthetic import fit_head, pairwise_accuracy, train


pytestmark = pytest.mark.usefixtures("one_thread")


LAION_SHAPES = {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}


def _hand_forward(sd, x):
    """LAION's MLP at eval time: five affine maps, no activations (dropout is the identity)."""
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return x.squeeze(-1)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_laion_state_dict_layout_loads_and_matches_hand_forward(tmp_path, fmt):
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in LAION_SHAPES.items()}
    path = tmp_path / f"head.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)  # LAION ships a plain torch state dict
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    head = load_head(path)
    assert head.dim == 768 and head.hidden == (1024, 128, 64, 16)
    x = F.normalize(torch.randn(5, 768, generator=g), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(head(x), _hand_forward(sd, x))


def test_wrong_layout_is_a_clear_error(tmp_path):
    sd = AestheticHead(16, (8, 8, 4, 4)).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        load_head(tmp_path / "bad.pth")


def _linear_preference(n, d, seed):
    """Unit embeddings and pairs ordered by a hidden linear utility u = w·e."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    b = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    a_wins = (a @ w > b @ w)[:, None]
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a), w


def test_bradley_terry_recovers_a_linear_preference():
    emb_w, emb_l, w = _linear_preference(3000, 32, seed=1)
    head = AestheticHead(32, (64, 32, 16, 8))
    torch.manual_seed(0)
    losses = fit_head(head, emb_w[:2500], emb_l[:2500], steps=400, batch_size=256, lr=3e-3)
    acc = pairwise_accuracy(head, emb_w[2500:], emb_l[2500:])
    print(f"held-out pairwise accuracy {acc:.3f}; loss {losses[0]:.3f} → {np.mean(losses[-20:]):.3f}")
    assert acc > 0.9 and np.mean(losses[-20:]) < 0.5 * losses[0]


def test_mse_on_ratings_fits_scores():
    g = torch.Generator().manual_seed(2)
    emb = F.normalize(torch.randn(2000, 16, generator=g), dim=-1)
    ratings = 5 + 2 * emb @ torch.randn(16, generator=g)
    head = AestheticHead(16, (32, 16, 8, 4))
    torch.manual_seed(0)
    fit_head(head, emb=emb[:1600], ratings=ratings[:1600], steps=400, lr=3e-3)
    with torch.no_grad():
        pred = head(emb[1600:])
    assert torch.corrcoef(torch.stack([pred, ratings[1600:]]))[0, 1] > 0.95


def test_reward_is_head_of_normalised_clip_embedding(tmp_path):
    head = AestheticHead(64, (32, 16, 8, 4))
    save_head(head, tmp_path / "head.safetensors")
    reward = AestheticReward(head=str(tmp_path / "head.safetensors"))  # shipped tiny CLIP (64-d)
    images, prompts, _ = S.make_batch(np.random.default_rng(0), 4)
    with torch.no_grad():  # the tiny CLIP's preprocessing is the identity on 32×32 images in [-1, 1]
        hand = head.eval()(F.normalize(reward.embedder.model.encode_image(images), dim=-1))
    torch.testing.assert_close(reward(images, prompts), hand)
    save_head(AestheticHead(768), tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match="head takes 768-d embeddings but the CLIP gives 64-d"):
        AestheticReward(head=str(tmp_path / "big.safetensors"))


def test_trainer_on_a_pairs_file(tmp_path):
    """Pairs of shapes images where the chosen one has a red object: the trained head must prefer red."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(60):
        red = S.render(S.scene_for_prompt(rng, f"a red {S.SHAPES[i % 3]}"))
        blue = S.render(S.scene_for_prompt(rng, f"a blue {S.SHAPES[(i + 1) % 3]}"))
        Image.fromarray(red).save(tmp_path / "img" / f"r{i}.png")
        Image.fromarray(blue).save(tmp_path / "img" / f"b{i}.png")
        rows.append({"prompt": "a nice picture", "chosen": f"img/r{i}.png", "rejected": f"img/b{i}.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("configs/pretrain/aesthetic_head.yaml", [
        f"data.pairs={tmp_path / 'pairs.jsonl'}", f"run.root={tmp_path}", "run.name=a", "run.tensorboard=false",
        "train.steps=150", "data.heldout_frac=0.2"])
    result = train(cfg)
    assert result["heldout_pairs"] == 12 and result["heldout_pairwise_accuracy"] >= 0.9
    reward = AestheticReward(head=str(tmp_path / "a"))  # a run folder → its latest checkpoint's head
    images = torch.stack([S.to_model_space(S.render(S.scene_for_prompt(rng, p)))
                          for p in ["a red circle", "a blue circle", "a red square", "a blue square"]])
    s = reward(images, [""] * 4)
    assert s[0] > s[1] and s[2] > s[3]
