"""PickScore, HPSv2, OCR on tiny random weights in the real layouts (OCR on real PP-OCRv4 weights)."""
import numpy as np
import rlgen  # noqa: F401  (torchvision shim before transformers' image processors)
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return u8.float() / 127.5 - 1, [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in u8]


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from rlgen.testing.tiny_pipelines import write_clip_tokenizer

    root = tmp_path_factory.mktemp("pickscore")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "vocab_size": 49408, "max_position_embeddings": 77,
                                  "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(root / "PickScore_v1")
    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(root / "tok")))
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(root / "processor")
    return root


def _reference_pickscore(root, pils, prompts):
    from transformers import CLIPModel, CLIPProcessor

    proc = CLIPProcessor.from_pretrained(str(root / "processor"))
    model = CLIPModel.from_pretrained(str(root / "PickScore_v1")).eval()
    with torch.no_grad():
        inp = proc(images=pils, text=prompts, padding=True, return_tensors="pt")
        out = model(**inp)
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (img * txt).sum(-1)


def test_pickscore_equals_clip_processor_route(pickscore_dirs):
    from rlgen.registry import REWARDS

    reward = REWARDS.get("pickscore")(model=str(pickscore_dirs / "PickScore_v1"),
                                      processor=str(pickscore_dirs / "processor"))
    prompts = ["a photo of a cat", "a red car", "two dogs"]
    x, pils = _images(3, 32)
    assert torch.allclose(reward(x, prompts), _reference_pickscore(pickscore_dirs, pils, prompts), atol=1e-4)
    x64, pils64 = _images(3, 64, seed=1)  # resized: torch bicubic vs PIL bicubic differ slightly
    assert torch.allclose(reward(x64, prompts), _reference_pickscore(pickscore_dirs, pils64, prompts), atol=0.05)
    half = REWARDS.get("pickscore")(model=str(pickscore_dirs / "PickScore_v1"),
                                    processor=str(pickscore_dirs / "processor"), scale=1 / 26)
    assert torch.allclose(half(x, prompts) * 26, reward(x, prompts), atol=1e-4)


def test_hub_ids_offline_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    from rewards.hpsv2 import HPSv2
    from rewards.pickscore import PickScore

    for build, name in ((PickScore, "yuvalkirstain/PickScore_v1"), (HPSv2, "xswu/HPSv2")):
        with pytest.raises(FileNotFoundError) as e:
            build()
        msg = str(e.value)
        assert "\n" not in msg and name in msg and "not in the local Hugging Face cache" in msg


def test_hpsv2_loads_its_state_dict_into_the_architecture(tmp_path):
    from rewards.clip_score import open_clip_module
    from rewards.hpsv2 import HPSv2

    oc = open_clip_module()
    torch.manual_seed(0)
    net, _, preprocess = oc.create_model_and_transforms("rlgen-tiny-clip", pretrained=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "hps.pt")
    reward = HPSv2(checkpoint=str(tmp_path / "hps.pt"), model="rlgen-tiny-clip")
    prompts = ["a cat", "a blue square"]
    x, pils = _images(2, 32)
    with torch.no_grad():
        img = net.eval().encode_image(torch.stack([preprocess(p) for p in pils]))
        txt = net.encode_text(oc.get_tokenizer("rlgen-tiny-clip")(prompts))
        want = torch.nn.functional.cosine_similarity(img, txt)
    assert torch.allclose(reward(x, prompts), want, atol=1e-4)


def test_hpsv2_asks_for_the_real_vit_h_14(monkeypatch, tmp_path):
    """The default architecture is open_clip's ViT-H-14 (HPSv2's), built without pretrained weights."""
    from rewards import hpsv2
    from rewards.clip_score import open_clip_module

    oc = open_clip_module()
    cfg = oc.get_model_config("ViT-H-14")
    assert cfg["vision_cfg"]["width"] == 1280 and cfg["vision_cfg"]["layers"] == 32 and cfg["embed_dim"] == 1024
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"")
    asked = {}

    def fake_create(name, pretrained=None, **kw):
        asked.update(name=name, pretrained=pretrained)
        raise RuntimeError("stop: not building a 1B-parameter model in a unit test")

    monkeypatch.setattr(oc, "create_model", fake_create)
    with pytest.raises(RuntimeError, match="stop"):
        hpsv2.HPSv2(checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"))
    assert asked == {"name": "ViT-H-14", "pretrained": None}


def test_clip_score_and_aesthetic_take_real_architectures_with_local_weights(monkeypatch, tmp_path):
    """clip_score / aesthetic: model=ViT-L-14 + pretrained=<local file> goes to open_clip as such."""
    from rewards import clip_score
    from rewards.clip_score import open_clip_module

    oc = open_clip_module()
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"")
    tiny = oc.create_model("rlgen-tiny-clip", pretrained=None)
    asked = []
    monkeypatch.setattr(oc, "create_model", lambda name, pretrained=None, **kw: asked.append((name, pretrained)) or tiny)
    real_tokenizer = oc.get_tokenizer
    monkeypatch.setattr(oc, "get_tokenizer", lambda name: real_tokenizer("rlgen-tiny-clip"))
    clip_score.load_clip(model="ViT-L-14", pretrained=str(weights))
    assert asked == [("ViT-L-14", str(weights))]


def _word(text, w=96, h=32, size=20):
    img = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(img).text((4, 4), text, fill="black", font=ImageFont.truetype("DejaVuSans.ttf", size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1


def test_ocr_reads_rendered_words():
    from rewards.ocr import OcrReward, text_score

    reward = OcrReward()
    images = torch.stack([_word("Hello"), _word("Garden"), _word("Hello")])  # small: upscaled before OCR
    prompts = ['a sign that says "Hello"', 'a poster with "Garden" on it', 'a sign that says "Banana"']
    scores = reward(images, prompts)
    assert scores[0] >= 0.99 and scores[1] >= 0.99 and scores[2] < 0.5
    assert reward(images[:1], ["no quotes here"]) == [None]
    assert text_score("helo", "hello") == pytest.approx(0.8) and text_score("xx hello yy", "Hello") == 1.0
