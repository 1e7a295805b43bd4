"""lm-eval (0.4.x) task definitions that read offline data copies.

BLiMP: :mod:`eval.lm_eval_tasks.generate` (and this folder's README.md). The
non-grammatical tasks of the double dissociation (``piqa_local``, ``arc_easy_local``,
``arc_challenge_local``, ``winogrande_local``, ``sciq_local``, ``lambada_openai_local``,
``openbookqa_local``, ``boolq_local``; group ``nongrammatical_local``) and the
``--include_path`` folder of ``negablate analyze tasks``: :mod:`eval.lm_eval_tasks.local`
(per-task YAMLs copied from lm_eval's in :mod:`eval.lm_eval_tasks.local_tasks`).
The lm_eval model ``negablate`` and the command line that registers it:
:mod:`eval.lm_eval_tasks.negablate_lm` (the two names below, so that callers need not
import lm_eval to build its command line).
"""

#: ``python -m`` this: lm_eval's command line with the ``negablate`` model registered.
LM_EVAL_MODULE = "eval.lm_eval_tasks.negablate_lm"
#: Its optional first argument: lm_eval indexes only ``--include_path`` (its CLI has no
#: switch for ``TaskManager(include_defaults=False)``; the bundled ~15k task YAMLs take
#: 20-70 s to index on a small CPU, for nothing when every task asked for is local).
LOCAL_INDEX_FLAG = "--negablate-local-task-index"
