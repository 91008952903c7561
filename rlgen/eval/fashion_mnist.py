"""The Fashion-MNIST benchmark: does a sample show its prompted class, how close is the sample
distribution to the real test split, and how diverse is each class?

Reported, overall and per class: ``accuracy`` of rlgen's classifier on the samples (its own
test-split accuracy is reported beside it), ``fd`` — Fréchet distance between the classifier's
penultimate features of samples and of the test split (FID-style), and ``diversity`` — mean
pairwise feature distance within a class, with ``diversity_real`` for the same on test images.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rlgen.data.fashion_mnist import CLASSES, FashionMNIST, class_from_prompt, class_prompt
from rlgen.eval.flow_common import FlowSampling, flow_sampling_from, generate_images, load_flow_policy, settings_dict
from rlgen.eval.metrics import frechet_distance, mean_pairwise_distance
from rlgen.registry import register_benchmark

DEFAULT_SAMPLES_PER_PROMPT = 100


def _classifier(path: str | None):
    from rewards.fashion_classifier import DEFAULT_CHECKPOINT
    from rlgen.models import load_model

    ckpt = Path(path) if path else DEFAULT_CHECKPOINT
    model = load_model(ckpt).eval()
    info = ckpt / "eval.json"
    test_acc = json.loads(info.read_text()).get("test_accuracy") if info.is_file() else None
    return model, test_acc


@torch.no_grad()
def _features(model, x: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i:i + batch])
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)


def quality_report(model, images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor,
                   real_labels: torch.Tensor) -> dict:
    """Accuracy, FD and diversity (overall and per class) of ``images`` against ``real``."""
    f_gen, logits = _features(model, images)
    f_real, _ = _features(model, real)
    correct = (logits.argmax(-1) == labels).float()
    per_task, fd_per, div_per, div_real = {}, {}, {}, {}
    for c, name in enumerate(CLASSES):
        m, mr = labels == c, real_labels == c
        if m.sum() == 0:
            continue
        per_task[name] = correct[m].mean().item()
        div_per[name] = mean_pairwise_distance(f_gen[m])
        div_real[name] = mean_pairwise_distance(f_real[mr])
        if m.sum() >= 2:
            fd_per[name] = frechet_distance(f_gen[m], f_real[mr])
    return {"accuracy": correct.mean().item(), "per_task": per_task, "n": len(labels),
            "fd": frechet_distance(f_gen, f_real), "fd_per_class": fd_per,
            "diversity": sum(div_per.values()) / len(div_per), "diversity_per_class": div_per,
            "diversity_real": sum(div_real.values()) / len(div_real)}


@register_benchmark("fashion_mnist")
def fashion_mnist_benchmark(req) -> dict:
    opts = dict(req.options)
    clf_path = opts.pop("classifier", None)
    k = req.samples_per_prompt or DEFAULT_SAMPLES_PER_PROMPT
    if req.prompts:
        lines = [ln.strip() for ln in Path(req.prompts).read_text().splitlines() if ln.strip()]
        labels = []
        for i, ln in enumerate(lines, 1):
            try:
                labels.append(class_from_prompt(ln))
            except ValueError as e:
                raise ValueError(f"{req.prompts}:{i}: {e}") from e
    else:
        labels = list(range(len(CLASSES)))
    sampling = flow_sampling_from(opts, FlowSampling())
    policy = load_flow_policy(req.checkpoint, req.device)
    prompts = [class_prompt(y) for y in labels for _ in range(k)]
    images = generate_images(policy, prompts, sampling, req.seed, req.batch_size, req.progress)
    clf, clf_acc = _classifier(clf_path)
    real, real_labels = FashionMNIST("test").tensors()
    result = quality_report(clf, images, torch.tensor([y for y in labels for _ in range(k)]), real, real_labels)
    result.update(settings_dict(sampling, k), classifier_test_accuracy=clf_acc, real_n=len(real_labels))
    if req.grid is not None:
        from rlgen.viz import save_image_grid

        idx = [i * k + j for i in range(len(labels)) for j in range(min(8, k))]
        save_image_grid(images[idx], req.grid, nrow=min(8, k), captions=[prompts[i] for i in idx], scale=3)
        result["grid"] = str(req.grid)
    return result
