"""rlgen rollouts: RolloutWorker actor, image/text rollout functions, vLLM engine actor."""
