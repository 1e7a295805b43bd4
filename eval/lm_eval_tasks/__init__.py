"""lm-eval (0.4.x) task definitions that read offline data copies.

BLiMP: :mod:`eval.lm_eval_tasks.generate` (and this folder's README.md). PIQA
(``piqa_local``) and the ``--include_path`` folder of ``negablate analyze tasks``:
:mod:`eval.lm_eval_tasks.local`.
"""
