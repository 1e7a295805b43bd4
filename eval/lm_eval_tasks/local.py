"""lm-eval (0.4.x) task folders for ``--include_path``: offline tasks generated from
local data, merged with the user's own task folders.

- :data:`LOCAL_TASKS`: the tasks that can be generated offline, name -> writer:
  ``piqa_local`` (:func:`write_piqa_task`): lm_eval's own ``piqa`` task reading the
  local copy in ``<data>/piqa`` (same prompt, choices, metrics and validation split);
  ``arc_easy_local``, ``arc_challenge_local``, ``winogrande_local``, ``sciq_local``,
  ``lambada_openai_local``, ``openbookqa_local``, ``boolq_local``
  (:mod:`eval.lm_eval_tasks.local_tasks`), likewise lm_eval's task of that name on its
  own evaluation split; and the group ``nongrammatical_local``
  (:func:`write_nongrammatical_group`), all eight at once.
- :func:`build_include_path`: writes the local tasks asked for into one folder and
  copies the user's task folders next to them (lm_eval takes a single
  ``--include_path`` and does not follow symlinks).
- :func:`declared_task_names`: the task, group and tag names a folder of YAMLs declares.

Used by ``negablate analyze tasks`` (:mod:`eval.analysis.lm_tasks`). The BLiMP task
YAMLs are :mod:`eval.lm_eval_tasks.generate`'s.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from eval.lm_eval_tasks.generate import _yaml_str
from eval.lm_eval_tasks.local_tasks import (
    _GENERATED,
    ARC_CHALLENGE_TASK,
    ARC_EASY_TASK,
    BOOLQ_TASK,
    EXTRA_LOCAL_TASKS,
    LAMBADA_OPENAI_TASK,
    OPENBOOKQA_TASK,
    SCIQ_TASK,
    WINOGRANDE_TASK,
    _write_if_changed,
    local_task_yaml,
    write_arc_challenge_task,
    write_arc_easy_task,
    write_boolq_task,
    write_lambada_openai_task,
    write_openbookqa_task,
    write_sciq_task,
    write_winogrande_task,
)

__all__ = [
    "ARC_CHALLENGE_TASK",
    "ARC_EASY_TASK",
    "BOOLQ_TASK",
    "LAMBADA_OPENAI_TASK",
    "LOCAL_TASKS",
    "NONGRAMMATICAL_GROUP",
    "NONGRAMMATICAL_TASKS",
    "OPENBOOKQA_TASK",
    "PIQA_TASK",
    "SCIQ_TASK",
    "WINOGRANDE_TASK",
    "build_include_path",
    "declared_task_names",
    "local_task_yaml",
    "nongrammatical_group_yaml",
    "piqa_task_yaml",
    "write_arc_challenge_task",
    "write_arc_easy_task",
    "write_boolq_task",
    "write_lambada_openai_task",
    "write_nongrammatical_group",
    "write_openbookqa_task",
    "write_piqa_task",
    "write_sciq_task",
    "write_winogrande_task",
]

PIQA_TASK = "piqa_local"


def piqa_task_yaml(data_file: Path, task: str = PIQA_TASK) -> str:
    """lm_eval's ``piqa`` task (0.4.x ``tasks/piqa/piqa.yaml``) reading ``data_file``.

    Prompt, choices, target and metrics are copied from lm_eval's YAML; only the
    data source differs (``dataset_path: json`` + an absolute ``data_files`` path
    instead of the hub's ``baber/piqa``), so accuracies are comparable with
    published lm_eval ``piqa`` numbers. No training split is declared: run it
    zero-shot (lm_eval 0.4.13 would draw few-shot examples from validation itself).
    """
    return "\n".join([
        _GENERATED,
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    validation: {_yaml_str(str(data_file))}",
        "output_type: multiple_choice",
        "validation_split: validation",
        'doc_to_text: "Question: {{goal}}\\nAnswer:"',
        "doc_to_target: label",
        'doc_to_choice: "{{[sol1, sol2]}}"',
        "should_decontaminate: true",
        "doc_to_decontamination_query: goal",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def write_piqa_task(out: str | Path, data_dir: str | Path | None = None, task: str = PIQA_TASK) -> list[Path]:
    """Write ``<out>/<task>/<task>.yaml`` and ``<out>/<task>/validation.jsonl``.

    The offline copy keeps the labels in a separate file (``valid-labels.lst``, as
    PIQA is distributed); lm_eval's task reads ``label`` from each document, so the
    two are joined line by line into one JSONL (the hub copy's layout). ``data_dir``
    is the ``piqa`` folder or the data root holding it (default: eval.data's root).
    Returns the written paths.
    """
    if data_dir is None:
        from eval.data import default_data_dir

        data_dir = default_data_dir()
    d = Path(data_dir).expanduser().resolve()
    if (d / "piqa").is_dir():
        d = d / "piqa"
    items_path, labels_path = d / "valid.jsonl", d / "valid-labels.lst"
    if not items_path.exists() or not labels_path.exists():
        raise FileNotFoundError(f"PIQA needs {items_path.name} and {labels_path.name} in {d}")
    items = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(items) != len(labels):
        raise ValueError(f"{items_path}: {len(items)} items but {labels_path}: {len(labels)} labels")
    folder = Path(out).expanduser().resolve() / task
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "validation.jsonl"
    rows = []
    for i, (item, lab) in enumerate(zip(items, labels)):
        if lab not in ("0", "1") or not all(k in item for k in ("goal", "sol1", "sol2")):
            raise ValueError(f"{items_path}:{i + 1}: expected goal/sol1/sol2 and a 0/1 label, got {lab!r}")
        rows.append(json.dumps({"goal": item["goal"], "sol1": item["sol1"], "sol2": item["sol2"],
                                "label": int(lab)}, ensure_ascii=False))
    _write_if_changed(data, "\n".join(rows) + "\n")
    yaml_path = folder / f"{task}.yaml"
    _write_if_changed(yaml_path, piqa_task_yaml(data, task))
    return [yaml_path, data]


NONGRAMMATICAL_GROUP = "nongrammatical_local"
# the non-grammatical tasks the group runs (PIQA, then local_tasks.py's, in that order)
NONGRAMMATICAL_TASKS: tuple[str, ...] = (PIQA_TASK, *EXTRA_LOCAL_TASKS)


def nongrammatical_group_yaml(group: str = NONGRAMMATICAL_GROUP) -> str:
    """An lm_eval group over :data:`NONGRAMMATICAL_TASKS`, so one ``--tasks`` name runs
    them all. No ``aggregate_metric_list``: the tasks' metrics differ (LAMBADA's
    perplexity) and an average over unrelated tasks would hide the per-task deltas, so
    lm_eval reports each task on its own."""
    return "\n".join([_GENERATED, f"group: {group}", "task:", *(f"  - {t}" for t in NONGRAMMATICAL_TASKS),
                      "metadata:", "  version: 1.0", ""])


def write_nongrammatical_group(out: str | Path, data_dir: str | Path | None = None) -> list[Path]:
    """Write every task of :data:`NONGRAMMATICAL_TASKS` and ``<out>/<group>/<group>.yaml``
    (a missing data folder is an error: the group must mean the same tasks everywhere).
    Returns the written paths, the group YAML first."""
    written: list[Path] = []
    for t in NONGRAMMATICAL_TASKS:
        written += LOCAL_TASKS[t](Path(out), None if data_dir is None else Path(data_dir))
    folder = Path(out).expanduser().resolve() / NONGRAMMATICAL_GROUP
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{NONGRAMMATICAL_GROUP}.yaml"
    _write_if_changed(path, nongrammatical_group_yaml())
    return [path, *written]


# name -> writer(out_dir, data_dir): offline tasks this module can generate.
LOCAL_TASKS: dict[str, Callable[[Path, Path | None], list[Path]]] = {
    PIQA_TASK: lambda out, data_dir: write_piqa_task(out, data_dir),
    **EXTRA_LOCAL_TASKS,
    NONGRAMMATICAL_GROUP: lambda out, data_dir: write_nongrammatical_group(out, data_dir),
}


def declared_task_names(paths: Iterable[Path]) -> set[str]:
    """Task, group and tag names declared by the YAMLs under ``paths`` (a light scan,
    no YAML parsing, as lm_eval YAMLs use custom tags like ``!function``)."""
    names: set[str] = set()
    for root in paths:
        for y in Path(root).rglob("*.yaml"):
            in_tag_list = False
            for line in y.read_text(encoding="utf-8", errors="replace").splitlines():
                m = re.match(r"^(task|group|tag):\s*(.*?)\s*$", line)
                if m:
                    value = m.group(2).strip("'\"")
                    in_tag_list = m.group(1) == "tag" and not value
                    if value and not value.startswith(("[", "{")):
                        names.add(value)
                    elif value.startswith("["):
                        names.update(v.strip(" '\"") for v in value.strip("[]").split(",") if v.strip())
                    continue
                if in_tag_list:
                    m = re.match(r"^\s+-\s*(\S+)", line)
                    if m:
                        names.add(m.group(1).strip("'\""))
                    elif line.strip():
                        in_tag_list = False
    return names


def build_include_path(tasks: Sequence[str], include_paths: Sequence[str | Path], root: str | Path,
                       data_dir: str | Path | None = None) -> tuple[Path | None, bool]:
    """Generate the local tasks among ``tasks`` and merge the user's ``include_paths``.

    lm_eval takes one ``--include_path`` and does not follow symlinks, so with more
    than one source (local tasks and/or several user folders) everything goes into
    ``root``: the generated tasks, and each user folder copied whole (so
    ``!function`` helpers and relative files keep working) as
    ``root/include_<i>_<name>``. A single user folder and no local task is passed as
    it is. Returns the folder to pass (or None) and whether every task in ``tasks``
    is defined locally (then the hub can be switched off for lm_eval).
    """
    local = [t for t in tasks if t in LOCAL_TASKS]
    users = [Path(p).expanduser().resolve() for p in include_paths]
    for p in users:
        if not p.is_dir():
            raise FileNotFoundError(f"--include-path {p}: not a folder")
    root = Path(root).resolve()
    if local:
        for t in local:
            LOCAL_TASKS[t](root, data_dir)
    if not local and len(users) == 1:
        include: Path | None = users[0]
    elif not local and not users:
        include = None
    else:
        for i, p in enumerate(users):
            dst = root / f"include_{i}_{p.name}"
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(p, dst)
        include = root
    declared = set(local) | declared_task_names(users)
    return include, all(t in declared for t in tasks)
