"""trl's own DPO loss code path, driven with given log-probs (no model, no Trainer set-up).

``DPOTrainer._compute_loss`` is called with a stand-in ``self`` holding just the attributes that
path reads, and a stand-in model whose per-token log-probs sum to the given sequence log-probs;
the reference log-probs go in as trl's precomputed ``ref_chosen_logps``/``ref_rejected_logps``.
What comes back is trl's loss and its logged rewards/accuracies/margins.
"""
from collections import defaultdict
from types import SimpleNamespace

import torch


def trl_dpo_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    from trl.trainer.dpo_trainer import DPOTrainer

    B, S = len(chosen_logps), 3
    per_token = torch.zeros(2 * B, S - 1, dtype=torch.float64)
    per_token[:, 0] = torch.cat([chosen_logps, rejected_logps]).double()  # sums to the given log-probs
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * B, S - 1),
                              mean_logits=torch.zeros(2 * B, S - 1), is_top1=torch.zeros(2 * B, S - 1, dtype=torch.bool))
    ones = torch.ones(2 * B, S, dtype=torch.long)
    inputs = {"input_ids": torch.zeros(2 * B, S, dtype=torch.long), "attention_mask": ones, "completion_mask": ones,
              "ref_chosen_logps": ref_chosen_logps.double(), "ref_rejected_logps": ref_rejected_logps.double()}
    identity = lambda x: x  # noqa: E731
    fake = SimpleNamespace(model=SimpleNamespace(training=True),
                           accelerator=SimpleNamespace(device="cpu", gather_for_metrics=identity, gather=identity),
                           aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                           f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
                           use_weighting=False, label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    m = fake._metrics["train"]
    return loss, {"accuracy": m["rewards/accuracies"][-1], "margin": m["rewards/margins"][-1]}
