"""Every ``NEGABLATE_*`` environment variable, read in one place.

The plugin runs in processes we do not start (vLLM's engine core and workers,
plain ``vllm serve``), so the environment is how settings reach them. Each
variable is a field here, with its default and what it does; the README's
table is made from the same list (:func:`describe`). Read afresh on every call
(:func:`get_settings`): tests and the launchers change the environment between
engines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKER_SLOTS = 8


class NegablateSettings(BaseSettings):
    """The ``NEGABLATE_*`` variables (prefix added to each field name)."""

    model_config = SettingsConfigDict(env_prefix="NEGABLATE_", extra="ignore", populate_by_name=True,
                                      env_ignore_empty=True)

    disable: bool = Field(False, description="Keep the plugin out of vLLM entirely (`1`).")
    kernel: Literal["sparse", "dense"] | None = Field(
        None, description="Force the clamp kernel: `sparse` (eager default) or `dense` (graph-safe; "
                          "chosen automatically when CUDA graphs are on).")
    worker_slots: int = Field(
        DEFAULT_WORKER_SLOTS, ge=1,
        validation_alias=AliasChoices("NEGABLATE_WORKER_SLOTS", "NEGABLATE_MAX_SETS"),
        description="Slots in each worker's clamp tables (old name: `NEGABLATE_MAX_SETS`). "
                    "`negablate serve --max-sets N` sets it to 2N+2: a replaced set keeps its "
                    "old slot until its running requests end.")
    neuron_sets_dir: Path | None = Field(
        None, description="Plain `vllm serve`: load every set in this folder at start-up.")
    default_set: str | None = Field(
        None, description="Plain `vllm serve`: the set requests naming none get (`none` always "
                          "selects no ablation).")
    admin_key: str | None = Field(
        None, description="Bearer token of the control API (`--admin-key` wins); unset: read-only.")
    data_dir: Path = Field(
        REPO_ROOT.parent / "shared" / "data",
        description="Data root: blimp/, tse/, tse-ml/, wikitext-2/, piqa/, ... (`--data-dir` wins).")
    cache: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "negablate",  # HOME as it is at the call
        description="Cache root; converted models go to `<cache>/models`.")
    eval_cache: Path | None = Field(
        None, description="SQLite score cache of the harness (default "
                          "`~/.cache/negablate/eval-scores.sqlite`; `--cache` wins).")
    batched_prompt_logprobs: bool = Field(
        True, description="Compute the prompt log-probs of all requests of a step together "
                          "(`0`: vLLM's per-request loop; same values, slower).")
    score_chunk_rows: int | None = Field(
        None, ge=1, description="Prompt log-prob rows computed together (default: as many as keep a "
                                "chunk's float32 scores under 128 MiB, at most 256; "
                                "`prompt_logprobs.rows_per_chunk`). Same values up to the blocking of "
                                "one matrix product; `bench/levers.py --chunk-rows` times it.")
    server: str = Field("http://127.0.0.1:8000", description="Server URL for `negablate eval`/`analyze` "
                                                            "(`--server` wins).")

    @field_validator("disable", mode="before")
    @classmethod
    def _any_value_but_off_disables(cls, value: object) -> bool:
        # vLLM loads the plugin in processes we do not start: never fail on a spelling
        if isinstance(value, str):
            return value.strip().lower() not in ("", "0", "false", "no", "off")
        return bool(value)


def get_settings() -> NegablateSettings:
    """The settings as the environment says now."""
    return NegablateSettings()


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, description) of every setting, for docs and ``--help``."""
    rows = []
    for name, field in NegablateSettings.model_fields.items():
        var = f"NEGABLATE_{name.upper()}"
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else str(default).replace(str(Path.home()), "~")
        if name == "data_dir":
            shown = "`../shared/data` beside the repo"
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        rows.append((var, shown, field.description or ""))
    return rows
