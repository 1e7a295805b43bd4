"""What a `negablate reproduce` run is: its settings and its conditions.

Apart from the orchestration in :mod:`eval.reproduce` so that the report
(:mod:`eval.report`) and the console script can read them without importing
the run itself. Light: pydantic only.

A run is a **top-p sweep**: one discovery pass scores every neuron, and each ``p`` of
``top`` gets its own Wasserstein set and controls from those scores. The **main p**
(the first of ``top``) also gets the Wasserstein-positive mirror, and its main
conditions (:data:`FULL_BLIMP_KINDS`) are scored on ``blimp_main_per_paradigm`` BLiMP
pairs per paradigm (1,000 = all 67,000 pairs), the rest on ``blimp_per_paradigm``.

Two **presets** size a run. ``standard`` (the default, the class defaults below) is what
``negablate reproduce`` does on a fresh machine: the main p only, about 2,000 BLiMP and
1,100 TSE pairs per condition, under 30 minutes for SmolLM2-135M on 2 cores.
``powered`` (:data:`POWERED`) is the published run: the top-p sweep, all 67,000 BLiMP pairs
for the main conditions, lm_eval's non-grammatical tasks and the layer analysis (hours).
Any explicit setting overrides its preset's value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from eval.lm_eval_tasks.local import NONGRAMMATICAL_TASKS
from vllm_negablate import defaults, set_names
from vllm_negablate.neuron_set import percent_label
from vllm_negablate.precision import DTYPES, normalize_dtype

RESULTS_ROOT = Path("docs") / "results"  # the default output folder is RESULTS_ROOT/<model name>

DiscoveryText = Literal["unk-removed", "detokenized", "tokenized"]
Preset = Literal["standard", "powered"]

# What ``preset="powered"`` changes from the standard run (the class defaults)
POWERED: dict[str, object] = {
    "top": [1.0, 2.0, 5.0],
    "discovery_tokens": 131_072,
    "blimp_per_paradigm": 200,
    "blimp_main_per_paradigm": 1000,
    "tse_per_test": 200,
    "ppl_windows": 16,
    "match_tokens": 16_384,
    "lm_tasks": list(NONGRAMMATICAL_TASKS),
    "layers_blimp_per_paradigm": 50,
    "matched_draws": 3,
}
PRESETS: dict[str, dict[str, object]] = {"standard": {}, "powered": POWERED}


class ReproduceConfig(BaseModel):
    """Every knob of a run; the defaults are the ``standard`` preset, what ``negablate
    reproduce`` does unless told otherwise.

    ``standard``: the main p (1%), 30 BLiMP pairs per paradigm (2,010; a minimal detectable
    effect near 1.5 points) and 50 per TSE test (1,100), 4 perplexity windows, discovery on
    32,768 tokens; under 30 minutes for SmolLM2-135M on 2 cores (README). ``powered``
    (:data:`POWERED`): the top-p sweep 1/2/5%, all 67,000 BLiMP pairs for the four main
    conditions (a 0.3-point minimal detectable effect), 200 pairs per paradigm and per TSE
    test elsewhere, three draws of the random perplexity-matched control, lm_eval's
    non-grammatical tasks and the layer analysis; hours on 2 cores, every phase resumes.

    float32 is the exact mode: every served ablation equals the transformers oracle to
    float tolerance. bfloat16 is the fast mode where the hardware has bf16 units
    (``avx512_bf16``, AMX, GPUs; 1.4-1.7x the float32 scoring rate on this project's
    2-core EPYC); its effect on decisions and deltas is in the README ("Precision").
    """

    model_config = ConfigDict(extra="forbid")

    preset: Preset = "standard"  # fills every setting not given (see PRESETS)
    model: str = "smollm2-135m"
    out: Path | None = None  # None: docs/results/<model name> (see :meth:`out_dir`)
    dtype: str = "float32"
    # percents of neurons per layer; the first is the main p (Wasserstein-positive, full BLiMP)
    top: list[float] = [1.0]
    discovery_tokens: int = 32_768
    # the discovery corpus (WikiText-2 valid): "unk-removed" drops the tokenized split's
    # <unk> tokens and keeps the rest as the reference's raw text has it (its " @-@ " too);
    # "detokenized" also undoes WikiText's tokenization; "tokenized": the file as it is
    discovery_text: DiscoveryText = "unk-removed"
    window: int = defaults.WINDOW_TOKENS  # discovery and perplexity-matching windows
    blimp_per_paradigm: int = 30
    blimp_main_per_paradigm: int = 30  # 1000 (>= the BLiMP paradigm size): all pairs
    tse_per_test: int = 50
    tse_source: Literal["tse", "tse-ml"] = "tse"  # all 22 Marvin & Linzen tests; "tse-ml": 15
    ppl_window: int = 2048  # the reference's perplexity windows (start token included)
    ppl_windows: int = 4
    ppl_text: Literal["raw", "tokenized"] = "raw"  # WikiText-2 test: raw (the reference's) or <unk>
    match_tokens: int = 8_192
    match_tol: float = 0.02  # relative; used only when match_tol_effect is None
    # tolerance of the perplexity-matched search as a share of the Wasserstein set's own
    # log-perplexity effect (a fixed 2% accepted even the unablated model on Gemma)
    match_tol_effect: float | None = 0.1
    match_max_iter: int = 8
    # independent draws of the random perplexity-matched control at the main p (seeds
    # seed, seed+1, ...): the comparison with it rests on which random neurons one draw
    # took, so the powered run searches and scores three and reports them side by side
    matched_draws: int = 1
    # the double dissociation: lm_eval's non-grammatical tasks (offline copies), for the
    # baseline, Wasserstein-negative and both perplexity-matched controls at the main p
    lm_tasks: list[str] = []  # powered: PIQA, ARC-E/C, WinoGrande, SciQ, LAMBADA, OBQA, BoolQ
    lm_tasks_limit: int | None = 300  # first N documents of each task (None: all)
    # depth (the main p's Wasserstein set one layer at a time and over the first k layers);
    # 0 pairs skips it
    layers_blimp_per_paradigm: int = 0
    layers_ks: list[int] | None = None  # None: 1, 2, 4, 8, ... and every layer
    cpu_bind_all_cores: bool = True
    seed: int = 0
    n_boot: int = 2_000
    kv_cache_mb: int = 1024
    data_dir: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_values(cls, data: object) -> object:
        """The preset's values for every setting not given explicitly."""
        if isinstance(data, dict):
            return {**PRESETS.get(data.get("preset", "standard"), {}), **data}
        return data

    @field_validator("dtype")
    @classmethod
    def _offered_dtype(cls, value: str) -> str:
        dtype = normalize_dtype(value)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {value!r}: use one of {', '.join(DTYPES)}")
        return dtype

    @field_validator("top")
    @classmethod
    def _percents(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("top needs at least one percent")
        bad = [p for p in value if not 0.0 < p <= 100.0]
        if bad:
            raise ValueError(f"top percents must be in (0, 100], got {bad}")
        return list(dict.fromkeys(float(p) for p in value))

    @model_validator(mode="after")
    def _counts(self) -> ReproduceConfig:
        for name in ("blimp_per_paradigm", "blimp_main_per_paradigm", "discovery_tokens", "ppl_window",
                     "window", "matched_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.blimp_main_per_paradigm < self.blimp_per_paradigm:
            raise ValueError(f"blimp_main_per_paradigm ({self.blimp_main_per_paradigm}) must be >= "
                             f"blimp_per_paradigm ({self.blimp_per_paradigm})")
        return self

    @property
    def main_top(self) -> float:
        return self.top[0]

    @property
    def full_blimp(self) -> bool:
        """Whether the main conditions get more BLiMP pairs than the sweep (their own runs)."""
        return self.blimp_main_per_paradigm > self.blimp_per_paradigm

    def with_preset(self, preset: str) -> ReproduceConfig:
        """This config with every setting a preset fills as ``preset`` fills it (the rest
        kept): what the same command with ``--preset preset`` would have run."""
        filled = ReproduceConfig(preset=preset)
        return self.model_copy(update={k: getattr(filled, k) for k in POWERED} | {"preset": preset})

    def out_dir(self) -> Path:
        """``out``, or ``docs/results/<model name>`` for the powered preset (the published
        runs) and ``docs/results/standard/<model name>`` for the standard one (a model
        folder: its name)."""
        if self.out is not None:
            return Path(self.out)
        name = Path(self.model).expanduser().name
        return RESULTS_ROOT / name if self.preset == "powered" else RESULTS_ROOT / self.preset / name


class ConditionSpec(BaseModel):
    """One served condition: a run-directory label, the set it serves, what it is."""

    label: str  # run directory under runs/ (and runs-full/)
    kind: str  # baseline, wasserstein-negative, ... (one of KINDS)
    top: float | None  # the p of its Wasserstein set; None for the baseline
    set_name: str | None  # None: no ablation
    description: str
    main: bool  # at the main p (the main table)
    full_blimp: bool  # scored on blimp_main_per_paradigm pairs too
    draw: int = 0  # a further draw of the random perplexity-matched control (seed + draw); 0: the first


BASELINE = "baseline"

# (kind, description); every kind but the baseline is served at each p unless MAIN_ONLY_KINDS
KINDS = [
    (BASELINE, "no ablation"),
    ("wasserstein-negative", "Wasserstein neurons, negative side zeroed"),
    ("wasserstein-positive", "same neurons, positive side zeroed"),
    ("random-negative", "random neurons, same count per layer"),
    ("perplexity-matched-negative", "random neurons, count matched to the Wasserstein perplexity"),
    ("perplexity-matched-bottom-negative",
     "lowest-W1 neurons (the reference's `bottom`), count matched to the Wasserstein perplexity"),
]
MAIN_ONLY_KINDS = frozenset({"wasserstein-positive"})
# the control drawn ``matched_draws`` times at the main p (the others are not random, or
# their effect is near zero with a tight CI)
REDRAWN_KIND = "perplexity-matched-negative"
# what the Wasserstein-negative set is compared with head to head (the paper's controls)
CONTROL_KINDS = ("random-negative", "perplexity-matched-negative", "perplexity-matched-bottom-negative")
# the controls a perplexity-matched search makes (the random pool's and the reference's bottom)
MATCHED_KINDS = ("perplexity-matched-negative", "perplexity-matched-bottom-negative")
LM_TASK_KINDS = ("wasserstein-negative", "perplexity-matched-negative", "perplexity-matched-bottom-negative")
FULL_BLIMP_KINDS = frozenset({BASELINE, "wasserstein-negative", "random-negative",
                              "perplexity-matched-bottom-negative"})


def condition_label(kind: str, top: float | None) -> str:
    """``baseline`` or ``{kind}-top{p}`` (``wasserstein-negative-top2``)."""
    return kind if top is None else f"{kind}-top{percent_label(top)}"


def set_name_for(kind: str, top: float, seed: int) -> str:
    names = {
        "wasserstein-negative": lambda: set_names.wasserstein_top(top),
        "wasserstein-positive": lambda: set_names.wasserstein_top(top, "positive"),
        "random-negative": lambda: set_names.random_control(top, seed),
        "perplexity-matched-negative": lambda: set_names.perplexity_matched(top, seed),
        "perplexity-matched-bottom-negative": lambda: set_names.perplexity_matched(top, seed, pool="bottom"),
    }
    return names[kind]()


def condition_sets(cfg: ReproduceConfig) -> list[ConditionSpec]:
    """Every condition of the run, in the order they are scored: the baseline, the main
    p's kinds and the further draws of its random perplexity-matched control
    (``matched_draws``), then the other p's."""
    out = [ConditionSpec(label=BASELINE, kind=BASELINE, top=None, set_name=None,
                         description=KINDS[0][1], main=True, full_blimp=cfg.full_blimp)]
    for p in cfg.top:
        main = p == cfg.main_top
        for kind, desc in KINDS[1:]:
            if kind in MAIN_ONLY_KINDS and not main:
                continue
            out.append(ConditionSpec(
                label=condition_label(kind, p), kind=kind, top=p, set_name=set_name_for(kind, p, cfg.seed),
                description=desc, main=main, full_blimp=main and cfg.full_blimp and kind in FULL_BLIMP_KINDS))
        if main:  # the main p's comparisons complete before the sweep's other p
            out += [ConditionSpec(
                label=f"{condition_label(REDRAWN_KIND, p)}-s{cfg.seed + draw}", kind=REDRAWN_KIND, top=p,
                set_name=set_name_for(REDRAWN_KIND, p, cfg.seed + draw),
                description=f"{dict(KINDS)[REDRAWN_KIND]}; draw {draw + 1} (seed {cfg.seed + draw})",
                main=False, full_blimp=False, draw=draw) for draw in range(1, cfg.matched_draws)]
    return out


def lm_task_sets(cfg: ReproduceConfig) -> list[str]:
    """The sets lm_eval's tasks are run with (besides the baseline): the main p's
    Wasserstein-negative set and both perplexity-matched controls."""
    return [set_name_for(kind, cfg.main_top, cfg.seed) for kind in LM_TASK_KINDS]


def default_ks(num_layers: int) -> list[int]:
    """Depths of the first-k curve: powers of two below the depth, and the depth itself."""
    ks, k = [], 1
    while k < num_layers:
        ks.append(k)
        k *= 2
    return [*ks, num_layers]
