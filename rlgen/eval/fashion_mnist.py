"""The Fashion-MNIST benchmark: does a sample show its prompted class, how close is the sample
distribution to the real test split, and how diverse is each class?

Reported, overall and per class, with the number of samples behind each (``n``, ``n_per_class``):
``accuracy`` of rlgen's classifier on the samples (its own test-split accuracy is reported beside
it) and ``mean_score`` (mean p(prompted class), the ``fashion_classifier`` reward); ``fd`` — Fréchet
distance between the classifier's penultimate features (D = 128) of samples and of the test split
(FID-style), with ``fd_floor``, the FD that as many real train images reach (FD is biased upwards at
small n); and ``diversity`` — mean pairwise feature distance within a class, with
``diversity_real`` for the same on test images. The overall diversity is the mean over classes.
``--set clip=DIR`` adds ``clip_accuracy``: zero-shot class accuracy of a CLIP (e.g.
rlgen/assets/clip_fashion_mnist), a second opinion when the classifier itself is the RL reward.

    python -m rlgen.evaluate --checkpoint rlgen/assets/flow_fashion_base --benchmark fashion_mnist \
        --samples-per-prompt 100 --set clip=rlgen/assets/clip_fashion_mnist --out eval.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rlgen.data.fashion_mnist import CLASSES, PROMPTS, FashionMNIST, class_from_prompt, class_prompt
from rlgen.eval.flow_common import (SAMPLING_OPTIONS, FlowSampling, attach_grid, check_flow_policy, flow_sampling_from,
                                    generate_images, settings_dict)
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
    """Penultimate features (N, D) and logits (N, classes) of images (N, 1, 28, 28) in [-1, 1]."""
    feats, logits = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i:i + batch])
        feats.append(f)
        logits.append(model.head(f))
    if not feats:
        raise ValueError("fashion_mnist metrics: no images to score")
    return torch.cat(feats), torch.cat(logits)


class FashionReference:
    """The classifier and its features of the real test split, computed once: an RL run scores
    every evaluation against the same reference.

    ``pool``/``pool_labels`` (real images independent of the test split, e.g. the train split) give
    the FD floor: the FD that real images reach with the same number of samples per class as the
    generated set. FD is biased upwards at small n, so a generated set's FD reads against this
    floor, and two FDs compare only at the same n.
    """

    def __init__(self, model, real: torch.Tensor, real_labels: torch.Tensor, pool: torch.Tensor | None = None,
                 pool_labels: torch.Tensor | None = None, test_accuracy: float | None = None, seed: int = 0):
        self.model, self.real_labels, self.test_accuracy = model, real_labels, test_accuracy
        self.real_feats, _ = _features(model, real)          # (N_real, D)
        self.pool, self.pool_labels, self.seed = pool, pool_labels, seed
        self._floors: dict[tuple, dict] = {}
        self.diversity_real = {name: mean_pairwise_distance(self.real_feats[real_labels == c])
                               for c, name in enumerate(CLASSES) if (real_labels == c).any()}

    @classmethod
    def load(cls, classifier: str | None = None, with_floor: bool = True) -> "FashionReference":
        model, test_acc = _classifier(classifier)
        real, real_labels = FashionMNIST("test").tensors()
        pool, pool_labels = FashionMNIST("train").tensors() if with_floor else (None, None)
        return cls(model, real, real_labels, pool, pool_labels, test_acc)

    def _floor(self, counts: dict[int, int]) -> dict:
        """FD of real pool images drawn with these per-class counts against the test split (cached)."""
        key = tuple(sorted(counts.items()))
        if self.pool is None:
            return {}
        if key not in self._floors:
            g = torch.Generator().manual_seed(self.seed)
            picks = []
            for c, n in counts.items():
                pool_c = torch.nonzero(self.pool_labels == c).squeeze(1)
                picks.append(pool_c[torch.randperm(len(pool_c), generator=g)[:n]])
            feats, _ = _features(self.model, self.pool[torch.cat(picks)])
            labels = self.pool_labels[torch.cat(picks)]
            self._floors[key] = {"fd_floor": frechet_distance(feats, self._real_of(counts)),
                                 "fd_floor_per_class": {CLASSES[c]: frechet_distance(feats[labels == c], self._real_of({c: 1}))
                                                        for c, n in counts.items() if n >= 2}}
        return self._floors[key]

    def _real_of(self, classes) -> torch.Tensor:
        """Real test features of the given classes (all of them when every class is present)."""
        m = torch.isin(self.real_labels, torch.tensor(sorted(classes)))
        return self.real_feats[m]

    def report(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Accuracy, FD and diversity of ``images`` (N, 1, 28, 28) prompted with class ``labels`` (N,),
        overall and per class, with the number of samples behind each."""
        f_gen, logits = _features(self.model, images)
        correct = (logits.argmax(-1) == labels).float()
        p_class = logits.softmax(-1).gather(1, labels[:, None]).squeeze(1)  # the reward's own value
        counts = {c: int((labels == c).sum()) for c in range(len(CLASSES)) if (labels == c).any()}
        per_task, fd_per, div_per = {}, {}, {}
        for c, n in counts.items():
            name, m = CLASSES[c], labels == c
            per_task[name] = correct[m].mean().item()
            div_per[name] = mean_pairwise_distance(f_gen[m])
            if n >= 2:
                fd_per[name] = frechet_distance(f_gen[m], self._real_of({c: 1}))
        div_real = {CLASSES[c]: self.diversity_real[CLASSES[c]] for c in counts}
        out = {"accuracy": correct.mean().item(), "per_task": per_task, "n": len(labels),
               "n_per_class": {CLASSES[c]: n for c, n in counts.items()}, "mean_score": p_class.mean().item(),
               "fd": frechet_distance(f_gen, self._real_of(counts)), "fd_per_class": fd_per,
               "diversity": sum(div_per.values()) / len(div_per), "diversity_per_class": div_per,
               "diversity_real": sum(div_real.values()) / len(div_real), "diversity_real_per_class": div_real,
               "real_n": int(torch.isin(self.real_labels, torch.tensor(sorted(counts))).sum())}
        out.update(self._floor(counts))
        if self.test_accuracy is not None:
            out["classifier_test_accuracy"] = self.test_accuracy
        return out


def clip_accuracy(images: torch.Tensor, labels: torch.Tensor, checkpoint: str) -> dict:
    """Zero-shot class accuracy of a CLIP (open_clip folder) on the samples: the nearest of the ten
    class prompts. A second opinion from a model the classifier reward never saw (it is the reward
    itself only in a run that trains on clip_score)."""
    from rewards.clip_score import ClipEmbedder

    emb = ClipEmbedder(checkpoint=checkpoint, who="fashion_mnist clip")
    pred = (emb.embed_images(images) @ emb.embed_texts(list(PROMPTS)).T).argmax(-1).cpu()  # (N,)
    correct = (pred == labels).float()
    return {"clip_accuracy": correct.mean().item(), "clip_checkpoint": str(checkpoint),
            "clip_accuracy_per_class": {CLASSES[c]: correct[labels == c].mean().item()
                                        for c in range(len(CLASSES)) if (labels == c).any()}}


def quality_report(model, images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor,
                   real_labels: torch.Tensor) -> dict:
    """Accuracy, FD and diversity (overall and per class) of ``images`` against ``real`` (no FD floor)."""
    return FashionReference(model, real, real_labels).report(images, labels)


def _labels(req) -> list[int]:
    if req.prompts:
        from rlgen.utils import read_text_file

        lines = [ln.strip() for ln in read_text_file(req.prompts).splitlines() if ln.strip()]
        labels = []
        for i, ln in enumerate(lines, 1):
            try:
                labels.append(class_from_prompt(ln))
            except ValueError as e:
                raise ValueError(f"{req.prompts}:{i}: {e}") from e
        return labels
    return list(range(len(CLASSES)))


_REFERENCES: dict = {}  # classifier path → FashionReference: an RL run's worker computes the test features once


@register_benchmark("fashion_mnist")
def fashion_mnist_benchmark(req, policy) -> dict:
    opts = dict(req.options)
    clf_path = opts.pop("classifier", None)
    clip_path = opts.pop("clip", None)   # e.g. rlgen/assets/clip_fashion_mnist: adds clip_accuracy
    k = req.samples_per_prompt or DEFAULT_SAMPLES_PER_PROMPT
    labels = _labels(req)
    sampling = flow_sampling_from(opts, FlowSampling())
    check_flow_policy(policy, "fashion_mnist")
    prompts = [class_prompt(y) for y in labels for _ in range(k)]
    images = generate_images(policy, prompts, sampling, req.seed, req.batch_size, req.progress)
    if clf_path not in _REFERENCES:
        _REFERENCES[clf_path] = FashionReference.load(clf_path)
    ref = _REFERENCES[clf_path]
    label_t = torch.tensor([y for y in labels for _ in range(k)])
    result = ref.report(images, label_t)
    if clip_path:
        result.update(clip_accuracy(images, label_t, clip_path))
    result.update(settings_dict(sampling, k))
    idx = [i * k + j for i in range(len(labels)) for j in range(min(8, k))]
    attach_grid(req, result, images, prompts, idx, nrow=min(8, k), scale=3)
    return result


fashion_mnist_benchmark.options = {*SAMPLING_OPTIONS, "classifier", "clip"}
fashion_mnist_benchmark.prepare = _labels
