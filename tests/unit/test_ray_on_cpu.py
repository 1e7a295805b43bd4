"""Ray on vLLM's CPU platform, without an engine: the opt-in platform plugin, the env it
needs, and the PP receive-buffer fix's guards (the engines: tests/e2e/test_ray.py,
tests/e2e/test_pipeline_parallel.py)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_negablate import executors, ray_platform, vllm_adapter
from vllm_negablate.executors import (
    ENV_CPU_BIND,
    ENV_RAY_ADDRESS,
    RAY_ON_CPU_ENV,
    cpu_rank_binding,
    ray_on_cpu,
    ray_on_cpu_requested,
)

ROOT = Path(__file__).resolve().parents[2]
RAY_CPU = "vllm_negablate.vllm_adapter.RayCpuPlatform"
CPU = "vllm.platforms.cpu.CpuPlatform"


@pytest.fixture
def cpu_vllm():
    """This vLLM build detects the CPU platform (the CPU CI and this project's default)."""
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        pytest.skip("vLLM here does not detect a CPU platform")


# ------------------------------------------------------------- the opt-in itself
@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("false", False),
                                       ("Off", False), ("no", False), ("1", True), ("yes", True),
                                       ("true", True)])
def test_the_variable_is_read_like_the_other_switches(value, on):
    env = {} if value is None else {RAY_ON_CPU_ENV: value}
    assert ray_on_cpu_requested(env) is on


def test_unset_means_no_opinion_and_no_adapter_call(monkeypatch):
    monkeypatch.delenv(RAY_ON_CPU_ENV, raising=False)
    monkeypatch.setattr(vllm_adapter, "ray_cpu_platform_qualname", lambda: pytest.fail("asked the adapter"))
    assert ray_platform.register() is None


def test_set_asks_the_adapter(monkeypatch):
    monkeypatch.setenv(RAY_ON_CPU_ENV, "1")
    monkeypatch.setattr(vllm_adapter, "ray_cpu_platform_qualname", lambda: "some.Platform")
    assert ray_platform.register() == "some.Platform"


def test_the_adapter_names_the_subclass_only_where_vllm_detects_a_cpu(monkeypatch):
    import vllm.platforms

    monkeypatch.setattr(vllm.platforms, "cpu_platform_plugin", lambda: None)  # e.g. a CUDA build
    assert vllm_adapter.ray_cpu_platform_qualname() is None
    monkeypatch.setattr(vllm.platforms, "cpu_platform_plugin", lambda: CPU)
    assert vllm_adapter.ray_cpu_platform_qualname() == RAY_CPU


def test_the_platform_class_changes_the_ray_key_only(cpu_vllm):
    from vllm.platforms.cpu import CpuPlatform

    cls = vllm_adapter.RayCpuPlatform
    assert issubclass(cls, CpuPlatform) and cls is vllm_adapter.RayCpuPlatform  # built once
    assert cls.ray_device_key == "GPU" and CpuPlatform.ray_device_key == ""  # vLLM's class untouched
    assert f"{cls.__module__}.{cls.__qualname__}" == RAY_CPU
    assert pickle.loads(pickle.dumps(cls)) is cls  # Ray pickles it by name
    assert cls().is_cpu() and cls().device_type == "cpu"
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        vllm_adapter.NoSuchThing  # noqa: B018 - the module __getattr__ answers only its one name


def test_the_entry_point_is_declared_and_installed():
    from importlib.metadata import entry_points

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared["vllm.platform_plugins"] == {ray_platform.ENTRY_POINT_NAME: "vllm_negablate.ray_platform:register"}
    installed = {ep.name: ep.value for ep in entry_points(group="vllm.platform_plugins")}
    assert installed.get(ray_platform.ENTRY_POINT_NAME) == "vllm_negablate.ray_platform:register", (
        "reinstall the project (pip install -e .) to register the entry point")


def test_vllm_resolves_the_platform_by_the_variable(cpu_vllm, monkeypatch):
    """vLLM's own resolution (not run for real here: it runs once per process): the
    plugin wins over the builtin CPU platform when asked, and only then."""
    from vllm.platforms import resolve_current_platform_cls_qualname

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    monkeypatch.delenv(RAY_ON_CPU_ENV, raising=False)
    assert resolve_current_platform_cls_qualname() == CPU
    monkeypatch.setenv(RAY_ON_CPU_ENV, "1")
    assert resolve_current_platform_cls_qualname() == RAY_CPU
    monkeypatch.setenv("VLLM_PLUGINS", "negablate")  # an allow-list without it: not loaded
    assert resolve_current_platform_cls_qualname() == CPU
    monkeypatch.setenv("VLLM_PLUGINS", f"negablate,{ray_platform.ENTRY_POINT_NAME}")
    assert resolve_current_platform_cls_qualname() == RAY_CPU
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")  # vLLM skips platform plugins then (documented)
    assert resolve_current_platform_cls_qualname() == CPU


def test_a_fresh_process_gets_the_platform_and_the_plugin_still_loads(cpu_vllm):
    """For real, in a new process as Ray starts its actors: the platform resolved with the
    adapter imported *during* resolution (no nested resolution to the plain CPU platform),
    then the general plugin and its custom op, which ask for the platform again."""
    code = ("from vllm.platforms import current_platform as p\n"
            "import vllm_negablate, vllm_negablate.ops, torch\n"
            "vllm_negablate.register()\n"
            "from vllm.platforms import current_platform as q\n"
            "print(type(p).__name__, type(p).__mro__[1].__name__, p.ray_device_key, p is q,"
            " hasattr(torch.ops.negablate, 'ablate_'))\n")
    env = {**os.environ, RAY_ON_CPU_ENV: "1"}
    env.pop("VLLM_PLUGINS", None)
    env.pop("VLLM_TARGET_DEVICE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-5:] == ["RayCpuPlatform", "CpuPlatform", "GPU", "True", "True"], out.stdout


# --------------------------------------------------- the variable reaches Ray's actors
def _config(backend, runtime_env=None):
    return SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend=backend,
                                                           ray_runtime_env=runtime_env))


def test_the_variable_is_forwarded_to_the_actors_runtime_env(monkeypatch):
    runtime_env = pytest.importorskip("ray.runtime_env", reason="ray is not installed (the [ray] extra)")
    monkeypatch.setenv(RAY_ON_CPU_ENV, "1")
    config = _config("ray")
    assert vllm_adapter.forward_ray_on_cpu(config)
    assert config.parallel_config.ray_runtime_env["env_vars"] == {RAY_ON_CPU_ENV: "1"}
    theirs = runtime_env.RuntimeEnv(env_vars={"A": "b"})
    config = _config("ray", theirs)
    assert vllm_adapter.forward_ray_on_cpu(config)
    assert config.parallel_config.ray_runtime_env["env_vars"] == {"A": "b", RAY_ON_CPU_ENV: "1"}
    assert theirs["env_vars"] == {"A": "b"}  # a copy: the caller's runtime env is left as it was


@pytest.mark.parametrize("backend, value", [("mp", "1"), (None, "1"), ("ray", None)])
def test_nothing_is_forwarded_otherwise(monkeypatch, backend, value):
    if value is None:
        monkeypatch.delenv(RAY_ON_CPU_ENV, raising=False)
    else:
        monkeypatch.setenv(RAY_ON_CPU_ENV, value)
    config = _config(backend)
    assert not vllm_adapter.forward_ray_on_cpu(config)
    assert config.parallel_config.ray_runtime_env is None


# ----------------------------------------------------------- the engine's environment
@pytest.mark.parametrize("world, cores, want", [
    (2, [0, 1], "0|1"), (2, [1, 0], "0|1"), (2, [0, 1, 2, 3, 4, 5], "0,1,2|3,4,5"),
    (2, [0, 1, 2], "0|1"), (4, [2, 3, 4, 5], "2|3|4|5"), (1, [0, 1], "0,1"), (3, [0, 1], None),
])
def test_one_core_group_per_rank(world, cores, want):
    assert cpu_rank_binding(world, cores) == want


def test_ray_on_cpu_with_a_cluster_named_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_RAY_ADDRESS, "10.0.0.1:6379")
    monkeypatch.delenv(RAY_ON_CPU_ENV, raising=False)
    monkeypatch.delenv(ENV_CPU_BIND, raising=False)
    monkeypatch.setattr(executors, "_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(executors, "local_ray_cpu_node", lambda *a, **k: pytest.fail("started a node"))
    with ray_on_cpu(2) as address:
        assert address == "10.0.0.1:6379"
        assert os.environ[RAY_ON_CPU_ENV] == "1" and os.environ[ENV_CPU_BIND] == "0,1|2,3"
    assert RAY_ON_CPU_ENV not in os.environ and ENV_CPU_BIND not in os.environ
    monkeypatch.setenv(ENV_CPU_BIND, "3|2")  # the user's binding wins
    with ray_on_cpu(2):
        assert os.environ[ENV_CPU_BIND] == "3|2"
    assert os.environ[ENV_CPU_BIND] == "3|2"


def test_ray_on_cpu_without_a_cluster_starts_one_gpu_per_rank(monkeypatch):
    import contextlib

    monkeypatch.delenv(ENV_RAY_ADDRESS, raising=False)
    started = []

    @contextlib.contextmanager
    def fake_node(num_gpus, **kwargs):
        started.append(num_gpus)
        yield "127.0.0.1:1234"

    monkeypatch.setattr(executors, "local_ray_cpu_node", fake_node)
    with ray_on_cpu(4) as address:
        assert address == "127.0.0.1:1234"
    assert started == [4]


def test_serve_wraps_only_ray_on_cpu(monkeypatch):
    import contextlib

    from server import app

    calls = []
    monkeypatch.setattr(app, "ray_on_cpu", lambda world: calls.append(world) or contextlib.nullcontext())
    args = SimpleNamespace(distributed_executor_backend="ray", tensor_parallel_size=2, pipeline_parallel_size=3)
    monkeypatch.setattr(app.vllm_adapter, "is_cpu_platform", lambda: True)
    with app._executor_context(args):
        pass
    assert calls == [6]
    for backend, cpu in (("mp", True), (None, True), ("ray", False)):
        monkeypatch.setattr(app.vllm_adapter, "is_cpu_platform", lambda cpu=cpu: cpu)
        args.distributed_executor_backend = backend
        assert isinstance(app._executor_context(args), contextlib.nullcontext)
    assert calls == [6]


# ------------------------------------------------------ the PP receive buffer's guards
class _Runner:
    def __init__(self, buffer=None):
        self.intermediate_tensors = buffer
        self.max_num_tokens, self.device = 256, "cpu"
        self.model_config = SimpleNamespace(dtype="float32")
        self.model = SimpleNamespace(make_empty_intermediate_tensors=self._make)
        self.made = []

    def _make(self, **kwargs):
        self.made.append(kwargs)
        return {"hidden_states": "buffer"}


@pytest.mark.parametrize("first_rank, buffer, allocates", [
    (False, None, True), (True, None, False), (False, {"existing": 1}, False)])
def test_the_pp_buffer_is_allocated_on_later_ranks_only(monkeypatch, first_rank, buffer, allocates):
    import vllm.distributed

    monkeypatch.setattr(vllm.distributed, "get_pp_group", lambda: SimpleNamespace(is_first_rank=first_rank))
    runner = _Runner(buffer)
    assert vllm_adapter.allocate_pp_receive_buffer(runner) is allocates
    if allocates:
        assert runner.made == [{"batch_size": 256, "dtype": "float32", "device": "cpu"}]
        assert runner.intermediate_tensors == {"hidden_states": "buffer"}
    else:
        assert runner.made == [] and runner.intermediate_tensors is buffer
