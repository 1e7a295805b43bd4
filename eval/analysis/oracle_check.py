"""`negablate analyze oracle-check`: re-score logged lm_eval answers with the transformers oracle.

Why: a served result that surprises (on Gemma 3 270M the Wasserstein-negative set
*improves* LAMBADA by 7.7 points) should be checkable without trusting the server. The
server is tested against :class:`~vllm_negablate.oracle.HFAblationOracle` on tiny models;
this command does the same on a finished run's own requests, on the real model: it reads
the per-request answers lm_eval logged (``samples_<task>_*.jsonl``, kept by ``analyze
tasks`` and ``reproduce``), tokenizes each request exactly as lm_eval did (its own
``_encode_pair``, built from the run's ``request.json`` model arguments), and asks the
oracle (plain ``transformers``, float32, the clamp as forward-pre-hooks) for the
continuation's log-likelihood and greedy flag under the condition's neuron set.

It reports, per condition and task, the largest log-likelihood difference (and per
continuation token: a sum over a 30-token PIQA solution carries 30 tokens' rounding) and
whether every document's decision (the highest-scoring choice; for one-request tasks the
greedy flag) is the same. Float32 runs agree to about 1e-4 per token (Gemma 3 270M's
LAMBADA, 300 documents: 7e-5 at most); bfloat16 runs will not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from eval.progress_log import ProgressLog

console = Console()

DEFAULT_TOLERANCE = 1e-3
"""Largest |served - oracle| log-likelihood per continuation token accepted (float32: ~1e-4)."""


class RequestCheck(BaseModel):
    """One logged loglikelihood request: what the server answered and what the oracle says."""

    served_loglik: float
    oracle_loglik: float
    served_greedy: bool
    oracle_greedy: bool
    continuation_tokens: int

    @property
    def abs_diff(self) -> float:
        return abs(self.served_loglik - self.oracle_loglik)


class TaskCheck(BaseModel):
    """One condition x task: the first ``documents`` logged documents re-scored."""

    condition: str
    set: str | None
    task: str
    documents: int
    requests: int
    max_abs_diff: float
    max_abs_diff_per_token: float
    decisions_agree: int
    skipped_too_long: int = 0

    @property
    def ok(self) -> bool:
        return self.decisions_agree == self.documents


class OracleCheck(BaseModel):
    """The whole check, as written to ``oracle_check.json``."""

    folder: str
    model_dir: str
    tolerance: float
    tasks: list[TaskCheck]

    @property
    def passed(self) -> bool:
        return all(t.ok and t.max_abs_diff_per_token <= self.tolerance for t in self.tasks)


def run_model_args(request: dict[str, Any]) -> str:
    """The ``--model_args`` string a run's ``request.json`` recorded for lm_eval."""
    command = request.get("command", [])
    try:
        return command[command.index("--model_args") + 1]
    except (ValueError, IndexError):
        raise ValueError("request.json records no lm_eval --model_args") from None


def encoder_for(model_args: str) -> Any:
    """lm_eval's own model object, built from the run's ``--model_args`` as lm_eval built
    it (``create_from_arg_string``), used only for tokenizing and its ``max_length``.

    Its ``_encode_pair`` (trailing context spaces moved to the continuation, whole
    sequence encoded then split, BOS per ``add_bos_token``) is what decided the served
    token ids, so the oracle sees the same ones. Nothing is sent: no request is made.
    """
    from eval.lm_eval_tasks.negablate_lm import NegablateLoglikelihoodAPI

    return NegablateLoglikelihoodAPI.create_from_arg_string(model_args)


def encode_request(encoder: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm_eval's ``loglikelihood`` makes them."""
    if context == "":  # lm_eval conditions an empty context on its prefix token
        return [encoder.prefix_token_id], list(encoder.tok_encode(continuation))
    context_ids, continuation_ids = encoder._encode_pair(context, continuation)
    return list(context_ids), list(continuation_ids)


def sample_requests(sample: dict[str, Any]) -> list[tuple[str, str, float, bool]]:
    """(context, continuation, served loglik, served greedy) of each request of one logged document."""
    arguments = sample["arguments"]
    out = []
    for i, resp in enumerate(sample["resps"]):
        args = arguments[f"gen_args_{i}"]
        loglik, greedy = resp[0]
        out.append((args["arg_0"], args["arg_1"], float(loglik), str(greedy) == "True"))
    return out


def decisions_agree(checks: Sequence[RequestCheck]) -> bool:
    """Same decision: the same best choice (several requests) or the same greedy flag (one)."""
    if len(checks) == 1:
        return checks[0].served_greedy == checks[0].oracle_greedy
    served = max(range(len(checks)), key=lambda i: checks[i].served_loglik)
    oracle = max(range(len(checks)), key=lambda i: checks[i].oracle_loglik)
    return served == oracle


Scorer = Callable[[list[int], int], tuple[float, bool]]
"""(token ids, context length) -> (continuation log-likelihood, all-greedy)."""


def oracle_scorer(oracle: Any) -> Scorer:
    """The oracle's log-likelihood of ``ids[n_context:]`` given the rest, and its greedy flag."""
    import torch

    @torch.no_grad()
    def score(ids: list[int], n_context: int) -> tuple[float, bool]:
        input_ids = torch.tensor([ids], dtype=torch.long, device=oracle.device)
        # only the rows that predict the continuation (Gemma's LM head is 262k wide)
        keep = len(ids) - n_context + 1
        logits = oracle.model(input_ids=input_ids, logits_to_keep=keep).logits[0, -keep:-1].float()
        targets = input_ids[0, n_context:]
        logprobs = torch.log_softmax(logits, dim=-1)
        loglik = float(logprobs.gather(-1, targets[:, None]).sum())
        return loglik, bool((logits.argmax(-1) == targets).all())

    return score


def check_task(samples_file: Path, encoder: Any, score: Scorer, documents: int, max_length: int,
               condition: str, set_name: str | None, task: str,
               advance: Callable[[], None] = lambda: None) -> TaskCheck:
    """Re-score the first ``documents`` logged documents of one samples file (``advance``
    is called after each, for a progress bar)."""
    diffs, per_token, agree, done, requests, too_long = [0.0], [0.0], 0, 0, 0, 0
    with samples_file.open(encoding="utf-8") as fh:
        for line in fh:
            if done == documents:
                break
            checks = []
            for context, continuation, served, served_greedy in sample_requests(json.loads(line)):
                context_ids, continuation_ids = encode_request(encoder, context, continuation)
                ids = context_ids + continuation_ids
                if len(ids) > max_length:  # lm_eval left-truncated these: not checked here
                    too_long += 1
                    checks = []
                    break
                loglik, greedy = score(ids, len(context_ids))
                checks.append(RequestCheck(served_loglik=served, oracle_loglik=loglik,
                                           served_greedy=served_greedy, oracle_greedy=greedy,
                                           continuation_tokens=len(continuation_ids)))
            advance()
            if not checks:
                continue
            done += 1
            requests += len(checks)
            diffs += [c.abs_diff for c in checks]
            per_token += [c.abs_diff / max(1, c.continuation_tokens) for c in checks]
            agree += decisions_agree(checks)
    return TaskCheck(condition=condition, set=set_name, task=task, documents=done, requests=requests,
                     max_abs_diff=max(diffs), max_abs_diff_per_token=max(per_token),
                     decisions_agree=agree, skipped_too_long=too_long)


def load_sets(sets_dir: Path) -> dict[str, Any]:
    """Every neuron set in ``sets_dir`` by its name (file names need not match)."""
    from vllm_negablate.neuron_set import NeuronSet

    return {s.name: s for s in (NeuronSet.load(p) for p in sorted(sets_dir.glob("*.json")))}


def oracle_check(folder: Path, *, sets_dir: Path, documents: int, tasks: Sequence[str] | None = None,
                 conditions: Sequence[str] | None = None, model_dir: Path | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, oracle_factory: Callable[[Path], Any] | None = None,
                 ) -> OracleCheck:
    """Check every finished condition of an lm_tasks folder (``runs/<label>/<hash>/``)."""
    from lm_eval.utils import simple_parse_args_string

    from vllm_negablate.oracle import HFAblationOracle

    runs = sorted(p.parent for p in folder.glob("runs/*/*/request.json"))
    if conditions:
        runs = [r for r in runs if r.parent.name in conditions]
    finished = [r for r in runs if any(r.rglob("samples_*.jsonl"))]
    if not finished:
        raise ValueError(f"{folder}: no finished lm_eval run with logged samples under runs/ "
                         "(run `negablate analyze tasks` with --log-samples, the default)")
    requests = {run: json.loads((run / "request.json").read_text(encoding="utf-8")) for run in finished}
    sets = load_sets(sets_dir) if sets_dir.is_dir() else {}
    for request in requests.values():  # every set found before anything is scored
        condition = request["condition"]
        if condition.get("set") is not None and condition["set"] not in sets:
            raise ValueError(f"condition {condition['label']}: set {condition['set']!r} is not in "
                             f"{sets_dir} (give --sets-dir)")
    args = run_model_args(requests[finished[0]])
    encoder = encoder_for(args)
    model_dir = model_dir or Path(simple_parse_args_string(args)["tokenizer"])
    oracle = (oracle_factory or HFAblationOracle)(model_dir)
    score = oracle_scorer(oracle)
    results = []
    log = ProgressLog(console)  # plain lines when the output is a file (nohup), a bar otherwise
    with _progress() as progress:
        for run, request in requests.items():
            results += _check_run(run, request["condition"], sets, encoder, score, oracle, documents,
                                  tasks, progress, log)
    return OracleCheck(folder=str(folder), model_dir=str(model_dir), tolerance=tolerance, tasks=results)


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)


def _check_run(run: Path, condition: dict[str, Any], sets: dict[str, Any], encoder: Any, score: Scorer,
               oracle: Any, documents: int, tasks: Sequence[str] | None, progress: Any,
               log: ProgressLog) -> list[TaskCheck]:
    """Every selected task of one condition's run, under its set."""
    results = []
    set_name = condition.get("set")
    with oracle.ablated(sets.get(set_name) if set_name else None):
        for samples in sorted(run.rglob("samples_*.jsonl")):
            task = samples.name.removeprefix("samples_").rsplit("_", 1)[0]
            if tasks and task not in tasks and task.removesuffix("_local") not in tasks:
                continue
            with samples.open(encoding="utf-8") as fh:
                total = min(documents, sum(1 for _ in fh))
            bar = progress.add_task(f"{condition['label']} {task}", total=total)
            log.start(f"{condition['label']} {task}", total)

            def advance(bar: Any = bar) -> None:
                progress.advance(bar)
                log.advance(1)

            results.append(check_task(samples, encoder, score, documents, encoder.max_length,
                                      condition["label"], set_name, task, advance=advance))
            log.finish()
    return results


def print_check(check: OracleCheck) -> None:
    table = Table(title=f"served lm_eval answers vs the transformers oracle ({check.model_dir})")
    for col in ("condition", "task", "documents", "requests", "max |diff|", "per token", "same decision"):
        table.add_column(col, justify="left" if col in ("condition", "task") else "right", overflow="fold")
    for t in check.tasks:
        table.add_row(t.condition, t.task, str(t.documents), str(t.requests), f"{t.max_abs_diff:.1e}",
                      f"{t.max_abs_diff_per_token:.1e}", f"{t.decisions_agree}/{t.documents}")
    wide = console if console.is_terminal else Console(width=160)  # a log file: no folding at 80
    wide.print(table)
    verdict = "[green]agree[/green]" if check.passed else "[bold red]DISAGREE[/bold red]"
    wide.print(f"{verdict} (tolerance {check.tolerance:g} in log-likelihood per continuation token; "
                  "every decision the same)")


def load_check(path: Path) -> OracleCheck:
    """An ``oracle-check --out`` file."""
    return OracleCheck.model_validate_json(path.read_text(encoding="utf-8"))


def markdown_section(check: OracleCheck, name: str) -> str:
    """The check as a REPORT.md section (``name``: its file, relative to the report)."""
    verdict = "agree" if check.passed else "**disagree**"
    lines = [
        f"### Served lm_eval answers against the transformers oracle (`{name}`)", "",
        "`negablate analyze oracle-check` re-scored the logged requests of the first documents "
        "of each task with plain `transformers` (float32, the set's clamp as forward hooks), "
        f"tokenized as lm_eval tokenized them: they {verdict} (tolerance {check.tolerance:g} "
        "in log-likelihood per continuation token; a decision is the best choice, or for one-request "
        "tasks the greedy flag).", "",
        "| condition | task | documents | requests | max abs diff | per token | same decision |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {t.condition} | {t.task} | {t.documents} | {t.requests} | {t.max_abs_diff:.1e} | "
              f"{t.max_abs_diff_per_token:.1e} | {t.decisions_agree}/{t.documents} |" for t in check.tasks]
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    """Add ``oracle-check`` to ``app`` (mounted as ``negablate analyze``)."""

    @app.command("oracle-check")
    def oracle_check_cmd(
        folder: Path = typer.Argument(..., help="An lm_tasks folder (with runs/), e.g. "
                                                "docs/results/gemma-3-270m/lm_tasks."),
        documents: int = typer.Option(20, "--documents", "-n", help="First N logged documents per task."),
        task: list[str] | None = typer.Option(None, "--task", help="Only these tasks (repeatable; "
                                                                  "'lambada_openai' or 'lambada_openai_local')."),
        condition: list[str] | None = typer.Option(None, "--condition", help="Only these conditions "
                                                                            "(repeatable, e.g. baseline)."),
        sets_dir: Path | None = typer.Option(None, help="Folder of the conditions' neuron sets. Default: "
                                                        "FOLDER/../discovery/sets (reproduce's layout)."),
        model_dir: Path | None = typer.Option(None, help="HF model folder. Default: the run's tokenizer."),
        tolerance: float = typer.Option(DEFAULT_TOLERANCE, help="Largest log-likelihood difference per "
                                                                 "continuation token accepted."),
        out: Path | None = typer.Option(None, help="Write the check as JSON here."),
    ) -> None:
        """Re-score a finished lm_eval run's logged answers with plain transformers.

        Every logged request of the first --documents documents of each task, tokenized as
        lm_eval did, is scored by the oracle (float32, the neuron set's clamp as forward
        hooks) and compared with what the server answered. Exit status 1 if any
        log-likelihood differs by more than --tolerance per continuation token or any
        decision differs.

        Example: negablate analyze oracle-check docs/results/gemma-3-270m/lm_tasks
            --task lambada_openai -n 40
        """
        try:
            check = oracle_check(folder, sets_dir=sets_dir or folder.parent / "discovery" / "sets",
                                 documents=documents, tasks=task, conditions=condition,
                                 model_dir=model_dir, tolerance=tolerance)
        except (ValueError, OSError) as e:
            console.print(f"[bold red]error:[/bold red] {e}")
            raise typer.Exit(2) from None
        print_check(check)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(check.model_dump_json(indent=2) + "\n", encoding="utf-8")
        if not check.passed:
            raise typer.Exit(1)
