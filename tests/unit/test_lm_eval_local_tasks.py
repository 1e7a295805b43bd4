"""eval.lm_eval_tasks.local(_tasks): the offline copies of lm_eval's arc_easy, arc_challenge,
winogrande, sciq, lambada_openai, openbookqa and boolq, loaded by lm_eval's own
TaskManager from the generated folder (no network), checked against the local data files,
prompts written out by hand, and the installed lm_eval's YAMLs."""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from eval.lm_eval_tasks import local as L
from eval.lm_eval_tasks import local_tasks as LT

# What each task must give: the data file, the lm_eval YAML it copies, the split, the
# number of documents, the first document rendered (text, target, choices; choices None
# for loglikelihood tasks) and the gold-index counts over all documents.
CASES: dict[str, dict[str, Any]] = {
    "arc_easy_local": dict(
        folder="arc", file="ARC-Easy-test.jsonl", ref="arc/arc_easy.yaml", split="test", n=2376,
        text="Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        target=0,
        choices=["Sunlight is the source of energy for nearly all ecosystems.",
                 "Most ecosystems are found on land instead of in water.",
                 "Carbon dioxide is more available than other gases.",
                 "The producers in all ecosystems are plants."],
        gold={0: 596, 1: 585, 2: 633, 3: 561, 4: 1}),
    "arc_challenge_local": dict(
        folder="arc", file="ARC-Challenge-test.jsonl", ref="arc/arc_challenge.yaml", split="test", n=1172,
        text=("Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
              "Which is the most likely effect of this increase in rotation?\nAnswer:"),
        target=2,
        choices=["Planetary density will decrease.", "Planetary years will become longer.",
                 "Planetary days will become shorter.", "Planetary gravity will become stronger."],
        gold={0: 266, 1: 311, 2: 310, 3: 285}),
    # partial scoring: doc_to_text is the gold index, the choices are the two contexts
    "winogrande_local": dict(
        folder="winogrande", file="dev.jsonl", ref="winogrande/default.yaml", split="validation", n=1267,
        text=1, target="always got the easier cases.",
        choices=["Sarah was a much better surgeon than Maria so Sarah",
                 "Sarah was a much better surgeon than Maria so Maria"],
        gold={0: 628, 1: 639}),
    "sciq_local": dict(
        folder="sciq", file="test.jsonl", ref="sciq/sciq.yaml", split="test", n=1000,
        text=("Oxidants and Reductants Compounds that are capable of accepting electrons, such as O 2 or F2, "
              "are calledoxidants (or oxidizing agents) because they can oxidize other compounds. In the process "
              "of accepting electrons, an oxidant is reduced. Compounds that are capable of donating electrons, "
              "such as sodium metal or cyclohexane (C6H12), are calledreductants (or reducing agents) because they "
              "can cause the reduction of another compound. In the process of donating electrons, a reductant is "
              "oxidized. These relationships are summarized in Equation 3.30: Equation 3.30 Saylor URL: "
              "http://www. saylor. org/books.\nQuestion: Compounds that are capable of accepting electrons, "
              "such as o 2 or f2, are called what?\nAnswer:"),
        target=3, choices=["antioxidants", "Oxygen", "residues", "oxidants"],
        gold={3: 1000}),
    "lambada_openai_local": dict(
        folder="lambada", file="lambada_test.jsonl", ref="lambada/lambada_openai.yaml", split="test", n=5153,
        text=("In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n"
              "\"Figured if you're going to be out at night getting hit by cars, you might as well have some "
              "backup.\"\n\nI look at him, feeling stunned. Like this is some sort of sign. But as I stare at "
              "Harlin, his mouth curved in a confident grin, I don't care about"),
        target=" signs", choices=None, gold=None),
    "openbookqa_local": dict(
        folder="openbookqa", file="test_main.jsonl", ref="openbookqa/openbookqa.yaml", split="test", n=500,
        text=("A person wants to start saving money so that they can afford a nice vacation at the end of the "
              "year. After looking over their budget and expenses, they decide the best way to save money is to"),
        target=1,
        choices=["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                 "have lunch with friends"],
        gold={0: 138, 1: 126, 2: 132, 3: 104}),
    "boolq_local": dict(
        folder="boolq", file="val.jsonl", ref="super_glue/boolq/default.yaml", split="validation", n=3270,
        text=("Ethanol fuel -- All biomass goes through at least some of these steps: it needs to be grown, "
              "collected, dried, fermented, distilled, and burned. All of these steps require resources and an "
              "infrastructure. The total amount of energy input into the process compared to the energy released "
              "by burning the resulting ethanol fuel is known as the energy balance (or ``energy returned on "
              "energy invested''). Figures compiled in a 2007 report by National Geographic Magazine point to "
              "modest results for corn ethanol produced in the US: one unit of fossil-fuel energy is required to "
              "create 1.3 energy units from the resulting ethanol. The energy balance for sugarcane ethanol "
              "produced in Brazil is more favorable, with one unit of fossil-fuel energy required to create 8 "
              "from the ethanol. Energy balance estimates are not easily produced, thus numerous such reports "
              "have been generated that are contradictory. For instance, a separate survey reports that "
              "production of ethanol from sugarcane, which requires a tropical climate to grow productively, "
              "returns from 8 to 9 units of energy for each unit expended, as compared to corn, which only "
              "returns about 1.34 units of fuel energy for each unit of energy expended. A 2006 University of "
              "California Berkeley study, after analyzing six separate studies, concluded that producing "
              "ethanol from corn uses much less petroleum than producing gasoline.\nQuestion: does ethanol "
              "take more energy make that produces?\nAnswer:"),
        target=0, choices=["no", "yes"],
        gold={0: 1237, 1: 2033}),
}


def _by_hand(task: str, r: dict[str, Any]) -> tuple[Any, Any, list[str] | None]:
    """(doc_to_text, doc_to_target, doc_to_choice) of a raw local row, by lm_eval's
    documented prompt for the task (written out here, independently of the YAML)."""
    if task in ("arc_easy_local", "arc_challenge_local"):
        return f"Question: {r['question']}\nAnswer:", r["choices"]["label"].index(r["answerKey"]), r["choices"]["text"]
    if task == "winogrande_local":
        i = r["sentence"].index("_")
        return ({"1": 0, "2": 1}[r["answer"]], r["sentence"][i + 1:].strip(),
                [r["sentence"][:i] + r["option1"], r["sentence"][:i] + r["option2"]])
    if task == "sciq_local":
        return (f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:", 3,
                [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]])
    if task == "lambada_openai_local":
        words = r["text"].split(" ")
        return " ".join(words[:-1]), " " + words[-1], None
    if task == "openbookqa_local":
        return r["question_stem"], r["choices"]["label"].index(r["answerKey"].lstrip()), r["choices"]["text"]
    if task == "boolq_local":
        return f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", int(r["label"]), ["no", "yes"]
    raise KeyError(task)


def _gold(task: str, r: dict[str, Any]) -> int:
    """The gold choice index (WinoGrande's is its doc_to_text)."""
    text, target, _ = _by_hand(task, r)
    return text if task == "winogrande_local" else target


class _Loader(yaml.SafeLoader):
    """lm_eval YAMLs use ``!function``; keep it as a plain string to compare."""


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        pytest.skip("lm-eval not installed")
    return Path(spec.origin).parent / "tasks"


def _ref_yaml(rel: str) -> dict[str, Any]:
    """The installed lm_eval YAML, with its ``include:`` resolved."""
    path = _lm_eval_tasks_dir() / rel
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    if "include" in cfg:
        base = _ref_yaml(str(Path(rel).parent / cfg.pop("include")))
        cfg = {**base, **cfg}
    return cfg


def _raw(task: str) -> list[dict[str, Any]]:
    c = CASES[task]
    from eval.data import default_data_dir

    f = default_data_dir() / c["folder"] / c["file"]
    if not f.exists():
        pytest.skip(f"{task}: data absent ({f})")
    return [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub, and a private datasets cache (the json builder's arrow files)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    return tmp_path


def _task_manager(folder: Path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    try:  # index only the generated folder (fast; nothing of lm_eval's own)
        return TaskManager(include_path=str(folder), include_defaults=False)
    except TypeError:
        return TaskManager(include_path=str(folder))


def _load(folder: Path, name: str):
    tm = _task_manager(folder)
    if hasattr(tm, "load"):
        return tm.load([name])["tasks"][name]
    return tm.load_task_or_group([name])[name]


@pytest.mark.parametrize("task", list(CASES))
def test_local_task_loads_in_lm_eval_and_renders_like_lm_eval(task, offline):
    c = CASES[task]
    raw = _raw(task)
    assert len(raw) == c["n"]
    out = offline / "tasks"
    written = L.LOCAL_TASKS[task](out, None)
    yaml_path = written[0]
    assert yaml_path == (out / task / f"{task}.yaml").resolve()
    ours = yaml.load(yaml_path.read_text(encoding="utf-8"), Loader=_Loader)
    data_file = Path(ours["dataset_kwargs"]["data_files"][c["split"]])
    assert ours["task"] == task and ours["dataset_path"] == "json" and data_file.is_absolute()
    assert ours[f"{c['split']}_split"] == c["split"]
    assert ({"training_split", "validation_split", "test_split"} - {f"{c['split']}_split"}) & set(ours) == set()

    # everything but the data source is lm_eval's YAML, and the evaluated split is lm_eval's
    ref = _ref_yaml(c["ref"])
    source_keys = {"task", "tag", "include", "dataset_path", "dataset_name", "dataset_kwargs",
                   "training_split", "validation_split", "test_split"}
    assert {k: v for k, v in ours.items() if k not in source_keys} == \
        {k: v for k, v in ref.items() if k not in source_keys}
    assert (ref.get("test_split") or ref["validation_split"]) == c["split"]

    doc_task = _load(out, task)
    docs = doc_task.eval_docs
    assert len(docs) == len(raw) == c["n"]
    first = docs[0]
    assert doc_task.doc_to_text(first) == c["text"]
    assert doc_task.doc_to_target(first) == c["target"]
    if c["choices"] is not None:
        assert doc_task.OUTPUT_TYPE == "multiple_choice"
        assert doc_task.doc_to_choice(first) == c["choices"]
    else:
        assert doc_task.OUTPUT_TYPE == "loglikelihood"
    assert _by_hand(task, raw[0]) == (c["text"], c["target"], c["choices"])

    # a spread of documents, in file order, render as the hand-written prompt says
    for i in range(0, len(raw), 97):
        text, target, choices = _by_hand(task, raw[i])
        assert doc_task.doc_to_text(docs[i]) == text, i
        assert doc_task.doc_to_target(docs[i]) == target, i
        if choices is not None:
            assert doc_task.doc_to_choice(docs[i]) == choices, i
    if c["gold"] is not None:
        assert dict(collections.Counter(_gold(task, r) for r in raw)) == c["gold"]


def test_boolq_labels_become_hub_ints_and_winogrande_helpers_are_lm_evals(offline):
    raw = _raw("boolq_local")
    yaml_path, data = L.write_boolq_task(offline / "tasks")
    rows = [json.loads(x) for x in data.read_text(encoding="utf-8").splitlines()]
    assert data.parent == yaml_path.parent and len(rows) == 3270
    assert [type(r["label"]) for r in rows] == [int] * 3270
    assert collections.Counter(r["label"] for r in rows) == {0: 1237, 1: 2033}
    assert rows == [{**r, "label": int(r["label"])} for r in raw]
    mtime = data.stat().st_mtime_ns
    L.write_boolq_task(offline / "tasks")  # unchanged files are not rewritten (datasets cache)
    assert data.stat().st_mtime_ns == mtime

    _raw("winogrande_local")
    yaml_path, py = L.write_winogrande_task(offline / "tasks")
    assert py.name == "preprocess_winogrande.py" and py.parent == yaml_path.parent
    assert py.read_text() == (_lm_eval_tasks_dir() / "winogrande" / "preprocess_winogrande.py").read_text()
    # tasks whose local file already has the hub's layout read it in place
    (arc_yaml,) = L.write_arc_easy_task(offline / "tasks")
    from eval.data import default_data_dir

    assert f'test: "{(default_data_dir() / "arc" / "ARC-Easy-test.jsonl").resolve()}"' in arc_yaml.read_text()


def test_nongrammatical_group_lists_all_tasks(offline):
    for t in CASES:
        _raw(t)
    from eval.data import default_data_dir

    if not (default_data_dir() / "piqa" / "valid.jsonl").exists():
        pytest.skip("PIQA data absent")
    assert set(L.LOCAL_TASKS) == {"piqa_local", *CASES, "nongrammatical_local"}
    assert L.NONGRAMMATICAL_TASKS == ("piqa_local", "arc_easy_local", "arc_challenge_local", "winogrande_local",
                                      "sciq_local", "lambada_openai_local", "openbookqa_local", "boolq_local")
    inc, all_local = L.build_include_path(["nongrammatical_local"], [], offline / "inc")
    assert all_local and inc == (offline / "inc").resolve()
    assert L.declared_task_names([inc]) == {"nongrammatical_local", *L.NONGRAMMATICAL_TASKS}
    tm = _task_manager(inc)
    if not hasattr(tm, "load"):
        pytest.skip("lm_eval without TaskManager.load")
    loaded = tm.load(["nongrammatical_local"])
    assert loaded["group_map"] == {"nongrammatical_local": list(L.NONGRAMMATICAL_TASKS)}
    assert {t: len(task.eval_docs) for t, task in loaded["tasks"].items()} == {
        "piqa_local": 1838, **{t: c["n"] for t, c in CASES.items()}}


def test_bad_or_missing_data_is_refused(tmp_path):
    (tmp_path / "arc").mkdir()
    with pytest.raises(FileNotFoundError, match="ARC-Easy-test.jsonl"):
        L.write_arc_easy_task(tmp_path / "out", tmp_path)
    row = {"id": "x", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    (tmp_path / "arc" / "ARC-Easy-test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"ARC-Easy-test.jsonl:1: answerKey 'C'"):
        L.write_arc_easy_task(tmp_path / "out", tmp_path)
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "dev.jsonl").write_text(
        json.dumps({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="'_'"):
        L.write_winogrande_task(tmp_path / "out", tmp_path / "winogrande")  # the task folder itself works too
    # a good row in a tiny data root: the YAML reads it in place
    row["answerKey"] = "B"
    (tmp_path / "arc" / "ARC-Easy-test.jsonl").write_text(json.dumps(row) + "\n")
    (y,) = LT.write_arc_easy_task(tmp_path / "out", tmp_path)
    assert json.dumps(str((tmp_path / "arc" / "ARC-Easy-test.jsonl").resolve())) in y.read_text()
