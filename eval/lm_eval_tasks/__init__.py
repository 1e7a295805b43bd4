"""lm-eval (0.4.x) task definitions that read offline data copies.

BLiMP: :mod:`eval.lm_eval_tasks.generate` (and this folder's README.md). The
non-grammatical tasks of the double dissociation (``piqa_local``, ``arc_easy_local``,
``arc_challenge_local``, ``winogrande_local``, ``sciq_local``, ``lambada_openai_local``,
``openbookqa_local``, ``boolq_local``; group ``nongrammatical_local``) and the
``--include_path`` folder of ``negablate analyze tasks``: :mod:`eval.lm_eval_tasks.local`
(per-task YAMLs copied from lm_eval's in :mod:`eval.lm_eval_tasks.local_tasks`).
"""
