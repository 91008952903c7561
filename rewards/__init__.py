"""rlgen rewards: one reward per file; RewardWorker actor in worker.py."""
