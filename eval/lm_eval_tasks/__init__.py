"""lm-eval (0.4.x) task definitions that read the offline BLiMP copy.

See :mod:`eval.lm_eval_tasks.generate` and this folder's README.md.
"""
