"""Tiny random causal LMs for tests: built in seconds, no download, loadable by vLLM.

Tests need real model directories (``config.json`` + safetensors + tokenizer) that
both ``transformers`` and vLLM load like any checkpoint, with the three MLP
families the plugin has to handle:

- ``gpt_neox``: dense MLP with GELU (``dense_h_to_4h`` -> gelu), like Pythia;
- ``llama``: gated SwiGLU (``act(gate) * up``), like Llama/SmolLM2/Qwen;
- ``gemma3``: gated GeGLU with tanh-GELU, sliding + full attention layers, like Gemma 3.

Shapes are chosen for vLLM's CPU backend: hidden 64 with 2 heads of head_dim 32
(CPU attention supports only head sizes 32, 64, 80, ...). Weights are drawn with a
large ``initializer_range`` so that ablating a handful of neurons moves the
logprobs far above float32 noise, which is what an equivalence test needs.

The tokenizer is a byte-level BPE trained on local text (WikiText-2 valid if
present, else a built-in paragraph), so nothing is downloaded. It does **not**
add BOS by itself: callers prepend ``<bos>`` explicitly, exactly as the
evaluation code does for real models.

Builds are cached: a marker file written *last* records the build arguments, so
an interrupted build is never mistaken for a complete one.

Command line (build, and optionally compare vLLM's prompt logprobs to HF)::

    python -m vllm_negablate.testing.tiny_models OUT_DIR --kind llama [--check-vllm]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from vllm_negablate.neuron_set import ModelFingerprint
from vllm_negablate.paths import wikitext

TinyKind = Literal["gpt_neox", "llama", "gemma3"]
KINDS: tuple[str, ...] = ("gpt_neox", "llama", "gemma3")

# Bump whenever the construction below changes, so stale caches are rebuilt.
BUILDER_VERSION = 1
MARKER_NAME = "negablate_tiny_model.json"

HIDDEN_SIZE = 64
NUM_HEADS = 2
HEAD_DIM = 32  # vLLM CPU attention: head sizes 32, 64, 80, ... only
GATED_INTERMEDIATE = 128
DENSE_INTERMEDIATE = 256
MAX_POSITIONS = 512
VOCAB_SIZE = 512
INITIALIZER_RANGE = 0.2
# Gemma 3 mixes sliding-window and full attention; a short window makes the
# sliding layers actually differ from full attention on test prompts.
GEMMA3_SLIDING_WINDOW = 16
ROPE_THETA = 10_000.0
GEMMA3_ROPE_GLOBAL = 1_000_000.0
GEMMA3_ROPE_LOCAL = 10_000.0

# Special tokens get the first ids, in Gemma's order: pad 0, eos 1, bos 2, unk 3.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

TRAIN_TEXT_BYTES = 200_000

_FALLBACK_TEXT = """\
The quick brown fox jumps over the lazy dog. The keys to the cabinet are on the
table, and the author of the books that the critics praised was sitting there.
A language model assigns a probability to every sequence of words. The cats that
the dog chases run away, but the dog that chases the cats is tired. She said that
he would come back tomorrow, although nobody believed him. There were many people
in the house, and each of them had brought something to eat. The students who
passed the exam were happy; the teacher who wrote it was not surprised. In the
summer the river is low, and in the winter it freezes over. These are the days of
our lives, and those were the years of our youth. It is not clear whether the
results will hold for larger models, or whether they depend on the data.
"""


# ---------------------------------------------------------------- config.json helpers
def _read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a model directory") from None


def intermediate_size_of(model_dir: str | Path) -> int:
    """MLP width (neurons per layer) of a model directory, read from ``config.json``."""
    return fingerprint_of(model_dir).intermediate_size


def fingerprint_of(model_dir: str | Path) -> ModelFingerprint:
    """The :class:`ModelFingerprint` a neuron set for this model directory must carry."""
    try:
        return ModelFingerprint.from_hf_config(_read_config(model_dir))
    except ValueError as exc:
        raise ValueError(f"{model_dir}: config.json: {exc}") from None


def wikitext_head(lines: int, fallback_repeats: int = 20) -> str:
    """The first ``lines`` lines of WikiText-2's validation text: a discovery corpus for
    tests; without the shared data folder, the built-in fallback text repeated."""
    valid = wikitext("valid")
    if not valid.is_file():
        return _FALLBACK_TEXT * fallback_repeats
    with valid.open(encoding="utf-8") as f:
        return "".join(f.readline() for _ in range(lines))


def _training_text() -> str:
    valid = wikitext("valid")  # the data folder's (settings), wherever the checkout is
    if valid.is_file():
        with valid.open("rb") as f:
            text = f.read(TRAIN_TEXT_BYTES).decode("utf-8", errors="ignore")
        if text.strip():
            return text
    return _FALLBACK_TEXT


def _build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE trained on local text, wrapped for ``transformers``.

    Byte-level means every string is encodable (``<unk>`` is never produced), and
    no post-processor is attached, so no special token is ever added implicitly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _training_text().splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} got id {tok.token_to_id(name)}"

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=MAX_POSITIONS,
    )
    ids = wrapped("The cat sat.")["input_ids"]
    assert BOS_ID not in ids and EOS_ID not in ids, f"tokenizer adds special tokens: {ids}"
    return wrapped


# --------------------------------------------------------------------------- models
def _make_config(kind: str, vocab_size: int, num_layers: int):
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if kind == "gpt_neox":
        from transformers import GPTNeoXConfig

        # head_dim = hidden / heads = 32; rotary on the default 25% of it.
        cfg = GPTNeoXConfig(
            **common,
            intermediate_size=DENSE_INTERMEDIATE,
            hidden_act="gelu",
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA,
                             "partial_rotary_factor": 0.25},
            tie_word_embeddings=False,
        )
        cfg.architectures = ["GPTNeoXForCausalLM"]
    elif kind == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            **common,
            num_key_value_heads=NUM_HEADS,
            head_dim=HEAD_DIM,
            intermediate_size=GATED_INTERMEDIATE,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
            tie_word_embeddings=False,
        )
        cfg.architectures = ["LlamaForCausalLM"]
    elif kind == "gemma3":
        from transformers import Gemma3TextConfig

        # Like Gemma 3 (5 sliding : 1 global), here alternating: sliding, full, sliding, ...
        layer_types = [
            "full_attention" if (i + 1) % 2 == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
        cfg = Gemma3TextConfig(
            **common,
            num_key_value_heads=1,  # GQA, as in Gemma 3 270M
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            intermediate_size=GATED_INTERMEDIATE,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=layer_types,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_ROPE_LOCAL},
                "full_attention": {"rope_type": "default", "rope_theta": GEMMA3_ROPE_GLOBAL},
            },
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            tie_word_embeddings=True,
        )
        cfg.architectures = ["Gemma3ForCausalLM"]
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    cfg.dtype = "float32"
    return cfg


def _patch_config_json(model_dir: Path, kind: str) -> None:
    """Add top-level keys that older readers (transformers 4.x, some vLLM parsers) expect."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    if kind == "gemma3":
        cfg["rope_theta"] = GEMMA3_ROPE_GLOBAL
        cfg["rope_local_base_freq"] = GEMMA3_ROPE_LOCAL
    else:
        cfg["rope_theta"] = ROPE_THETA
    if kind == "gpt_neox":
        cfg["rotary_pct"] = 0.25
        cfg["rotary_emb_base"] = ROPE_THETA
    cfg["torch_dtype"] = "float32"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _patch_tokenizer_config(model_dir: Path) -> None:
    """Name the plain fast tokenizer class and pin 'no implicit BOS/EOS' for every reader."""
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg["bos_token"], cfg["eos_token"] = "<bos>", "<eos>"
    cfg["unk_token"], cfg["pad_token"] = "<unk>", "<pad>"
    cfg["model_max_length"] = MAX_POSITIONS
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _build_args(kind: str, seed: int, num_layers: int) -> dict[str, Any]:
    return {"builder_version": BUILDER_VERSION, "kind": kind, "seed": seed,
            "num_layers": num_layers}


def is_built(out_dir: str | Path, kind: str, seed: int = 0, num_layers: int = 2) -> bool:
    """Whether ``out_dir`` holds a complete build with exactly these arguments."""
    marker = Path(out_dir) / MARKER_NAME
    try:
        return json.loads(marker.read_text()) == _build_args(kind, seed, num_layers)
    except (OSError, ValueError):
        return False


def build_tiny_model(
    kind: TinyKind, out_dir: Path, seed: int = 0, num_layers: int = 2
) -> Path:
    """Build (or reuse) a tiny random causal LM of family ``kind`` in ``out_dir``.

    Deterministic given ``seed``: same weights, same tokenizer. Returns ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    out_dir = Path(out_dir)
    if is_built(out_dir, kind, seed, num_layers):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_NAME).unlink(missing_ok=True)

    tokenizer = _build_tokenizer()
    vocab_size = len(tokenizer)
    config = _make_config(kind, vocab_size, num_layers)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    if model.generation_config is not None:
        model.generation_config.bos_token_id = BOS_ID
        model.generation_config.eos_token_id = EOS_ID
        model.generation_config.pad_token_id = PAD_ID

    # Sanity: logits must be finite and not degenerate (else equivalence tests are vacuous).
    probe = [BOS_ID] + tokenizer("The keys to the cabinet are on the table.")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([probe])).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"tiny {kind} model produced non-finite logits (seed {seed})")

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _patch_config_json(out_dir, kind)
    _patch_tokenizer_config(out_dir)
    (out_dir / MARKER_NAME).write_text(json.dumps(_build_args(kind, seed, num_layers)) + "\n")
    return out_dir


# ------------------------------------------------------------------------------ CLI
def _check_vllm(model_dir: Path, prompts: list[list[int]]) -> float:
    """Max |vLLM prompt logprob - HF prompt logprob| over ``prompts`` (float32, eager)."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(model=str(model_dir), enforce_eager=True, gpu_memory_utilization=0.05,
              max_model_len=MAX_POSITIONS, dtype="float32", seed=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                        SamplingParams(max_tokens=1, prompt_logprobs=0))
    worst = 0.0
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        ref = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
        got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
        worst = max(worst, max(abs(a - b) for a, b in zip(ref, got)))
    return worst


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--check-vllm", action="store_true",
                   help="load the model in vLLM and compare prompt logprobs with transformers")
    args = p.parse_args(argv)
    path = build_tiny_model(args.kind, args.out_dir, args.seed, args.num_layers)
    print(f"built {args.kind} at {path}: {fingerprint_of(path).model_dump()}")
    if args.check_vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        texts = [
            "The keys to the cabinet are on the table.",
            "The authors that the guard likes have left, and the senator who met them is tired of waiting.",
            " = Homarus gammarus = \n Homarus gammarus , known as the European lobster or common "
            "lobster , is a species of lobster from the eastern Atlantic Ocean , Mediterranean Sea "
            "and parts of the Black Sea .",
        ]
        prompts = [[BOS_ID] + tok(t)["input_ids"] for t in texts]
        print(f"prompt lengths {[len(p) for p in prompts]}")
        print(f"max |vLLM - HF| prompt logprob: {_check_vllm(path, prompts):.3e}")


if __name__ == "__main__":
    main()
