"""lm_eval model ``negablate``: ``local-completions`` with log-likelihoods from our own route.

lm_eval's ``local-completions`` scores a (context, continuation) pair by asking
``/v1/completions`` to echo the whole prompt with a log-probability per position,
then keeps the continuation's. ``negablate serve`` answers the same question at
``/v1/negablate/loglikelihood`` (:mod:`server.loglikelihood`) without computing the
context's rows (about half of Gemma 3's lm_eval time). This class changes only
that: requests, tokenization, truncation, caching (``--use_cache``), retries and
generation (``generate_until`` still goes to ``/v1/completions``) are lm_eval's own.

Use it as ``local-completions``, with the same ``--model_args`` (``base_url`` the
completions URL, as there)::

    python -m eval.lm_eval_tasks.negablate_lm --model negablate \\
        --model_args model=BASE@SET,base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=huggingface,tokenizer=DIR \\
        --tasks piqa_local --include_path DIR

(``python -m eval.lm_eval_tasks.negablate_lm`` is lm_eval's own command line with
this model registered: lm_eval has no plugin entry point for models. A first argument
:data:`LOCAL_INDEX_FLAG` limits lm_eval's task index to ``--include_path``.)
"""

from __future__ import annotations

import sys
from operator import itemgetter
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI

from eval.lm_eval_tasks import LOCAL_INDEX_FLAG

LOGLIKELIHOOD_PATH = "/v1/negablate/loglikelihood"
COMPLETIONS_PATH = "/v1/completions"


@register_model("negablate")
class NegablateLoglikelihoodAPI(LocalCompletionsAPI):
    """``local-completions`` whose ``loglikelihood`` requests go to ``/v1/negablate/loglikelihood``."""

    def __init__(self, base_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_url=base_url, **kwargs)
        if not self.tokenized_requests:  # the route takes token ids: lm_eval must tokenize
            raise ValueError("the negablate model needs token ids: a tokenizer "
                             "(tokenizer_backend=huggingface) and tokenized_requests=True")
        root = (base_url or "").rstrip("/").removesuffix(COMPLETIONS_PATH)
        self._completions_url = root + COMPLETIONS_PATH
        self._loglikelihood_url = root + LOGLIKELIHOOD_PATH

    # lm_eval posts to ``self.base_url`` whatever the request type; its loglikelihood
    # and generation phases never overlap, so each phase points it at its route.
    def _loglikelihood_tokens(self, requests, **kwargs):
        self.base_url = self._loglikelihood_url
        return super()._loglikelihood_tokens(requests, **kwargs)

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.base_url = self._completions_url
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def batch_loglikelihood_requests(self, chunks):
        """lm_eval's inputs (context + continuation, left-truncated to ``max_length``)
        split back at its context length: the route needs to know where the scored part starts."""
        inputs, ctxlens, cache_keys = super().batch_loglikelihood_requests(chunks)
        items = [{"context": list(tokens[:n]), "continuation": list(tokens[n:])}
                 for tokens, n in zip(inputs, ctxlens, strict=True)]
        return items, ctxlens, cache_keys

    def _create_payload(self, messages, generate: bool = False, gen_kwargs: dict | None = None,
                        seed: int = 1234, eos=None, **kwargs: Any) -> dict:
        if generate:
            return super()._create_payload(messages, generate=True, gen_kwargs=gen_kwargs, seed=seed,
                                           eos=eos, **kwargs)
        return {"model": self.model, "items": list(messages)}

    @staticmethod
    def parse_logprobs(outputs: dict | list[dict], tokens=None, ctxlens=None, **kwargs: Any) -> list[tuple[float, bool]]:
        res = []
        for out in outputs if isinstance(outputs, list) else [outputs]:
            res += [(float(d["logprob"]), bool(d["is_greedy"])) for d in sorted(out["data"], key=itemgetter("index"))]
        return res


def _index_include_path_only() -> None:
    import lm_eval.tasks.manager as manager

    init = manager.TaskManager.__init__

    def local_only(self, *args, include_defaults: bool = False, **kwargs):
        init(self, *args, include_defaults=include_defaults, **kwargs)

    manager.TaskManager.__init__ = local_only


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line, with the ``negablate`` model registered (by this module's import)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [LOCAL_INDEX_FLAG]:
        args = args[1:]
        _index_include_path_only()
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
