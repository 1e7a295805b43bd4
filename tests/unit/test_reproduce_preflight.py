"""`negablate reproduce` refuses what it cannot do before any engine starts: an unknown model,
a data folder missing files the run reads, an output folder made with other settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import eval.reproduce as rep
from eval.data import BLIMP_PARADIGMS, TSE_ML_TESTS, TSE_TESTS, missing_data
from eval.reproduce import PreflightError, ReproduceConfig, preflight
from eval.reproduce_config import POWERED


def _data(root: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """An empty-file stand-in of ../shared/data with every file reproduce reads."""
    files = ([f"blimp/{p}.jsonl" for p in BLIMP_PARADIGMS]
             + [f"tse/{t}.jsonl" for t in TSE_TESTS]
             + [f"tse-ml/{t}_all.jsonl" for t in TSE_ML_TESTS]
             + ["wikitext-2/valid.txt", "wikitext-2/test.txt", "wikitext-2/raw/wiki.test.raw"])
    for rel in files:
        if rel not in drop:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("")
    return root


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(rep.reproduce_command)
    return app


def test_missing_data_names_each_missing_file(tmp_path):
    root = _data(tmp_path, drop=("blimp/wh_island.jsonl", "tse/simple_npi_anim.jsonl",
                                 "wikitext-2/test.txt"))
    assert missing_data(root) == ["blimp/wh_island.jsonl", "tse/simple_npi_anim.jsonl",
                                  "wikitext-2/test.txt"]
    assert missing_data(root, tse=False) == ["blimp/wh_island.jsonl", "wikitext-2/test.txt"]
    assert missing_data(root, blimp=False, tse=False, wikitext=()) == []
    assert len(missing_data(tmp_path / "nowhere", tse_ml=True)) == 67 + 22 + 15 + 2


def test_preflight_accepts_a_complete_setup(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    data = _data(tmp_path / "data")
    cfg = ReproduceConfig(model=str(model), out=tmp_path / "out", data_dir=data)
    assert preflight(cfg) == data
    assert preflight(cfg.model_copy(update={"model": "smollm2-135m"})) == data  # embedded name


def test_preflight_refuses_an_unknown_model(tmp_path):
    cfg = ReproduceConfig(model="gpt-17", out=tmp_path / "out", data_dir=_data(tmp_path / "d"))
    with pytest.raises(PreflightError, match=r"'gpt-17' is not a model folder.*gemma-3-270m"):
        preflight(cfg)


def test_preflight_refuses_a_data_folder_missing_a_test_set(tmp_path):
    data = _data(tmp_path / "d", drop=tuple(f"tse/{t}.jsonl" for t in TSE_TESTS[:8]))
    cfg = ReproduceConfig(model="smollm2-135m", out=tmp_path / "out", data_dir=data)
    with pytest.raises(PreflightError, match=r"lacks 8 file\(s\).*tse/long_vp_coord.jsonl.* and 2 more"):
        preflight(cfg)
    # the agreement-only TSE of Newman et al. needs its own folder, not the 22 tests
    assert preflight(cfg.model_copy(update={"tse_source": "tse-ml"})) == data
    with pytest.raises(PreflightError, match="use tse"):
        preflight(cfg.model_copy(update={"tse_source": "blimp"}))


def test_preflight_refuses_an_output_folder_with_other_settings(tmp_path):
    data = _data(tmp_path / "d")
    out = tmp_path / "out"
    out.mkdir()
    first = ReproduceConfig(model="smollm2-135m", out=out, data_dir=data, blimp_per_paradigm=15)
    (out / "config.json").write_text(first.model_dump_json())
    # how a run runs, or where, may change; what it computes may not
    preflight(first.model_copy(update={"kv_cache_mb": 4096, "n_boot": 10_000, "cpu_bind_all_cores": False}))
    with pytest.raises(PreflightError, match=r"blimp_per_paradigm 15 -> 200; top \[1.0\] -> \[2.0\]"):
        preflight(first.model_copy(update={"blimp_per_paradigm": 200, "top": [2.0]}))
    # a folder from an older version that did not record a setting: its value is unknown
    old = json.loads((out / "config.json").read_text())
    del old["discovery_text"]
    (out / "config.json").write_text(json.dumps(old))
    with pytest.raises(PreflightError, match=r"not recorded there: discovery_text"):
        preflight(first)


def test_more_draws_of_the_matched_control_resume_a_folder(tmp_path):
    """matched_draws only adds conditions of its own (other seeds, other labels), so a
    folder takes a new value, and one from before the setting (one draw) resumes."""
    data = _data(tmp_path / "d")
    out = tmp_path / "out"
    out.mkdir()
    first = ReproduceConfig(preset="powered", out=out, data_dir=data)
    old = json.loads(first.model_dump_json())
    del old["matched_draws"]  # as a powered folder from before the setting recorded itself
    (out / "config.json").write_text(json.dumps(old))
    assert first.matched_draws == 3
    preflight(first)
    preflight(first.model_copy(update={"matched_draws": 5}))
    with pytest.raises(PreflightError, match=r"tse_per_test 200 -> 100"):
        preflight(first.model_copy(update={"tse_per_test": 100, "matched_draws": 5}))
    with pytest.raises(ValueError, match="matched_draws must be >= 1"):
        ReproduceConfig(matched_draws=0)


def test_the_default_output_folder_is_per_model_and_preset(tmp_path):
    assert ReproduceConfig().out_dir() == Path("docs/results/standard/smollm2-135m")
    assert ReproduceConfig(preset="powered").out_dir() == Path("docs/results/smollm2-135m")
    assert ReproduceConfig(model="gemma-3-270m", preset="powered").out_dir() == Path("docs/results/gemma-3-270m")
    assert ReproduceConfig(model=str(tmp_path / "my-model")).out_dir() == Path("docs/results/standard/my-model")
    assert ReproduceConfig(out=tmp_path / "x", preset="powered").out_dir() == tmp_path / "x"


def test_presets_fill_what_is_not_given_and_yield_to_what_is():
    standard, powered = ReproduceConfig(), ReproduceConfig(preset="powered")
    assert (standard.top, standard.blimp_per_paradigm, standard.tse_per_test, standard.full_blimp,
            standard.lm_tasks, standard.layers_blimp_per_paradigm) == ([1.0], 30, 50, False, [], 0)
    assert (powered.top, powered.blimp_per_paradigm, powered.blimp_main_per_paradigm, powered.full_blimp,
            len(powered.lm_tasks), powered.layers_blimp_per_paradigm) == ([1.0, 2.0, 5.0], 200, 1000, True, 8, 50)
    # the settings the powered preset does not change are the standard ones
    same = {k for k in ReproduceConfig.model_fields if k not in POWERED and k != "preset"}
    assert all(getattr(standard, k) == getattr(powered, k) for k in same)
    mixed = ReproduceConfig(preset="powered", blimp_main_per_paradigm=200, top=[2.0])
    assert (mixed.top, mixed.blimp_main_per_paradigm, mixed.tse_per_test, mixed.full_blimp) == ([2.0], 200, 200, False)
    with pytest.raises(ValueError, match="preset"):
        ReproduceConfig(preset="huge")


def test_a_folder_of_the_other_preset_is_refused_with_the_flag_that_resumes_it(tmp_path):
    data = _data(tmp_path / "d")
    out = tmp_path / "out"
    out.mkdir()
    powered = ReproduceConfig(preset="powered", out=out, data_dir=data)
    (out / "config.json").write_text(powered.model_dump_json(exclude={"preset"}))  # as older runs wrote it
    preflight(powered)  # the same settings resume, whatever the preset was called
    with pytest.raises(PreflightError, match=r"top \[1.0, 2.0, 5.0\] -> \[1.0\].*add --preset powered"):
        preflight(ReproduceConfig(out=out, data_dir=data))


@pytest.mark.parametrize("update, message", [
    ({"top": [0.0, 1.0]}, "must be in \\(0, 100\\]"),
    ({"top": [150.0]}, "must be in \\(0, 100\\]"),
    ({"top": []}, "at least one percent"),
    ({"blimp_main_per_paradigm": 10, "blimp_per_paradigm": 20}, "must be >= blimp_per_paradigm"),
    ({"discovery_text": "pretty"}, "discovery_text"),
    ({"dtype": "int8"}, "use one of"),
])
def test_bad_settings_are_refused(update, message):
    with pytest.raises(ValueError, match=message):
        ReproduceConfig(**update)


def test_top_list_keeps_its_order_once_each():
    cfg = ReproduceConfig(top=[2, 1, 2.0, 5])
    assert cfg.top == [2.0, 1.0, 5.0] and cfg.main_top == 2.0


def test_the_command_stops_before_any_engine(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(rep, "bind_worker_to_all_cores", lambda: started.append("bind"), raising=False)
    monkeypatch.setattr(rep, "resolve_model", lambda *a: started.append("model"))
    monkeypatch.setattr(rep, "discover", lambda *a: started.append("discovery"))
    monkeypatch.setattr("vllm_negablate.offline.bind_worker_to_all_cores", lambda: started.append("bind"))
    monkeypatch.setenv("NEGABLATE_DATA_DIR", str(_data(tmp_path / "d")))
    res = CliRunner().invoke(_app(), ["--model", "gpt-17", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "not a model folder" in res.output, res.output
    for bad, said in ((["--top", "1,0"], "(0, 100]"), (["--top", "1,x"], "separated by commas"),
                      (["--blimp-per-paradigm", "0"], "blimp_per_paradigm")):
        res = CliRunner().invoke(_app(), ["--model", "smollm2-135m", "--out", str(tmp_path / "r"), *bad])
        assert res.exit_code == 2 and said in res.output, (bad, res.output)
    assert not started and not (tmp_path / "r").exists()
