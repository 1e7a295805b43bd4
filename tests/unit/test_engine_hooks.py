"""Engine-core pinning: the set is fixed at admission and salts the prefix-cache key.

Uses vLLM's real ``Request`` and block hasher, so a change in how vLLM keys
cached blocks shows up here and not as silently mixed answers.
"""

import pytest
from vllm import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.request import Request

from vllm_negablate.engine_hooks import EngineCoreMirror, UnknownNeuronSetError, salt_for
from vllm_negablate.runtime import NEURON_SET_HASH_KEY, NEURON_SET_KEY
from vllm_negablate.vllm_adapter import pin_request  # engine_hooks.pin_set + block rehash

BLOCK = 16
PROMPT = list(range(100, 140))  # 40 tokens: 2 full blocks


@pytest.fixture(scope="module")
def hasher():
    init_none_hash(sha256)
    return get_request_block_hasher(BLOCK, sha256)


def request(hasher, params, salt=None, rid="r"):
    return Request(rid, PROMPT, params, None, cache_salt=salt, block_hasher=hasher)


def mirror(default=None):
    m = EngineCoreMirror()
    m.update({"sets": {"A": {"content_hash": "aaaa"}, "B": {"content_hash": "bbbb"}},
              "default": default})
    return m


def test_unablated_requests_keep_vllms_own_key(hasher):
    req = request(hasher, SamplingParams(max_tokens=1))
    before = list(req.block_hashes)
    assert pin_request(req, mirror()) is None
    assert req.cache_salt is None and req.block_hashes == before and len(before) == 2


def test_named_set_pins_hash_and_salts_every_block(hasher):
    plain = request(hasher, SamplingParams(max_tokens=1))
    shared = SamplingParams(max_tokens=1, extra_args={NEURON_SET_KEY: "A"})
    a = request(hasher, shared, rid="a")
    assert pin_request(a, mirror()) == "A"
    assert a.sampling_params.extra_args == {NEURON_SET_KEY: "A", NEURON_SET_HASH_KEY: "aaaa"}
    assert shared.extra_args == {NEURON_SET_KEY: "A"}  # the caller's object is not mutated
    assert a.cache_salt == salt_for("aaaa", None) == "negablate:aaaa"
    assert len(a.block_hashes) == 2
    # chained hashes: every block differs from the unablated request's
    assert all(x != y for x, y in zip(a.block_hashes, plain.block_hashes))
    b = request(hasher, SamplingParams(max_tokens=1, extra_args={NEURON_SET_KEY: "B"}))
    pin_request(b, mirror())
    assert all(x != y for x, y in zip(a.block_hashes, b.block_hashes))
    a2 = request(hasher, SamplingParams(max_tokens=1, extra_args={NEURON_SET_KEY: "A"}))
    pin_request(a2, mirror())
    assert a2.block_hashes == a.block_hashes  # same set: cache is shared


def test_default_is_pinned_at_admission_and_user_salt_kept(hasher):
    req = request(hasher, SamplingParams(max_tokens=1), salt="tenant-1")
    m = mirror(default="B")
    assert pin_request(req, m) == "B"
    m.update({"sets": {"B": {"content_hash": "bbbb"}}, "default": None})  # default switched later
    assert req.sampling_params.extra_args[NEURON_SET_HASH_KEY] == "bbbb"
    assert req.cache_salt == "negablate:bbbb:tenant-1"


def test_unknown_or_stale_sets_raise(hasher):
    with pytest.raises(UnknownNeuronSetError, match="'C' is not loaded"):
        pin_request(request(hasher, SamplingParams(max_tokens=1, extra_args={NEURON_SET_KEY: "C"})), mirror())
    stale = SamplingParams(max_tokens=1, extra_args={NEURON_SET_KEY: "A", NEURON_SET_HASH_KEY: "old"})
    with pytest.raises(UnknownNeuronSetError, match="expected old"):
        pin_request(request(hasher, stale), mirror())


def test_none_selector_wins_over_the_default_and_no_set_is_pinned_as_none(hasher):
    m = mirror(default="A")
    explicit = request(hasher, SamplingParams(max_tokens=1, extra_args={NEURON_SET_KEY: "none"}))
    before = list(explicit.block_hashes)
    assert pin_request(explicit, m) is None
    assert explicit.sampling_params.extra_args == {NEURON_SET_KEY: "none"}
    assert explicit.cache_salt is None and explicit.block_hashes == before
    # no set and no default at admission: pinned as "none", so a default set later
    # (before the worker first sees the request) cannot reach it
    plain = request(hasher, SamplingParams(max_tokens=1), rid="p")
    assert pin_request(plain, mirror(default=None)) is None
    assert plain.sampling_params.extra_args == {NEURON_SET_KEY: "none"}
    assert plain.cache_salt is None and plain.block_hashes == before
