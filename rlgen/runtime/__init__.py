"""Run folders, checkpoints, metrics, and (later) the Ray/DeepSpeed actors and the Trainer.

Kept import-light: ``rlgen.runtime.rundir`` has no Ray or DeepSpeed dependency so pretraining and
evaluation use the same run layout without starting a cluster.
"""
