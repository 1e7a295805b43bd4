"""The dtypes offered, and the refusals that come before any engine starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vllm_negablate.precision import DtypeError, check_dtype_runnable, cpu_has_bf16_units, normalize_dtype

EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize("given, want", [("torch.bfloat16", "bfloat16"), ("BF16", "bfloat16"),
                                         ("fp32", "float32"), ("float32", "float32"), ("half", "float16")])
def test_normalize(given, want):
    assert normalize_dtype(given) == want


def test_bf16_units_from_cpuinfo():
    assert cpu_has_bf16_units(EPYC) is True
    assert cpu_has_bf16_units(GRAVITON) is True
    assert cpu_has_bf16_units(OLD_XEON) is False


def test_check_dtype_runnable():
    assert check_dtype_runnable("bf16", cpuinfo=EPYC, gpu=False) == "bfloat16"
    assert check_dtype_runnable("float32", cpuinfo=OLD_XEON, gpu=False) == "float32"
    assert check_dtype_runnable("bfloat16", cpuinfo=OLD_XEON, gpu=True) == "bfloat16"  # the GPU runs it
    with pytest.raises(DtypeError, match="no bf16 units.*--dtype float32"):
        check_dtype_runnable("bfloat16", cpuinfo=OLD_XEON, gpu=False)
    for bad in ("float16", "auto", "int8"):
        with pytest.raises(DtypeError, match="not offered: use float32"):
            check_dtype_runnable(bad, cpuinfo=EPYC, gpu=True)


def test_reproduce_refuses_a_dtype_before_any_engine(tmp_path, monkeypatch):
    import eval.reproduce as rep

    started = []
    monkeypatch.setattr(rep, "reproduce", lambda cfg: started.append(cfg))
    import typer

    app = typer.Typer()
    app.command()(rep.reproduce_command)
    res = CliRunner().invoke(app, ["--dtype", "float16", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "not offered" in res.output and not started
    res = CliRunner().invoke(app, ["--dtype", "fp32", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0 and started[0].dtype == "float32"
    with pytest.raises(ValueError, match="use one of float32, bfloat16"):
        rep.ReproduceConfig(dtype="float16")


def test_eval_refuses_an_unknown_dtype():
    from eval.cli import app

    res = CliRunner().invoke(app, ["blimp", "-s", "http://127.0.0.1:9", "-m", "x", "--dtype", "float16"])
    assert res.exit_code == 2 and "use one of float32, bfloat16" in res.output
