"""Set names come from one place: what the recipes write is what the consumers ask for."""

from __future__ import annotations

import numpy as np
import pytest

from eval.analysis.dynamics import condition_set_names
from eval.analysis.layers import default_base_set
from eval.reproduce_config import ReproduceConfig, condition_sets
from vllm_negablate import set_names
from vllm_negablate.discovery.recipes import mode_variant, random_control, restrict_layers, wasserstein_set
from vllm_negablate.neuron_set import ModelFingerprint

FP = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=3, intermediate_size=100)


@pytest.mark.parametrize("percent", [1.0, 0.5, 5.0])
def test_recipes_and_consumers_agree(percent):
    scores = np.random.default_rng(0).random((3, 100))
    wset = wasserstein_set(scores, FP, percent)
    pos = mode_variant(wset, "positive")
    rnd = random_control(wset, seed=3)
    label = f"{percent:g}"
    assert wset.name == set_names.wasserstein_top(percent) == f"wasserstein-top{label}"
    assert pos.name == set_names.wasserstein_top(percent, "positive") == f"wasserstein-top{label}-positive"
    assert rnd.name == set_names.random_control(percent, 3) == f"random-top{label}-s3"
    assert random_control(wset, seed=3, include_wasserstein=True).name == f"random-top{label}-s3-incl"
    assert set_names.perplexity_matched(percent, 3) == f"perplexity-matched-top{label}-s3"
    assert set_names.perplexity_matched(percent, 3, pool="bottom") == f"perplexity-matched-bottom-top{label}"
    assert restrict_layers(wset, [1]).name == set_names.layer_restricted(wset.name, [1]) == f"{wset.name}-layer1"
    assert restrict_layers(wset, [0, 1]).name == f"{wset.name}-first2"
    assert restrict_layers(wset, [0, 2]).name == f"{wset.name}-layers0_2"
    cfg = ReproduceConfig(top=[percent], seed=3)
    assert [s.set_name for s in condition_sets(cfg)] == [
        None, wset.name, pos.name, rnd.name, set_names.perplexity_matched(percent, 3),
        set_names.perplexity_matched(percent, 3, pool="bottom")]
    assert condition_set_names(percent, 3) == {"wasserstein-negative": wset.name, "random-negative": rnd.name}
    assert default_base_set({"top_percent": percent}) == wset.name


def test_a_sweep_serves_each_p_and_the_mirror_only_at_the_main_p():
    cfg = ReproduceConfig(top=[2, 1], seed=0, preset="powered")
    specs = condition_sets(cfg)
    labels = [s.label for s in specs]
    assert labels == [
        "baseline", "wasserstein-negative-top2", "wasserstein-positive-top2", "random-negative-top2",
        "perplexity-matched-negative-top2", "perplexity-matched-bottom-negative-top2",
        # the powered preset's further draws of the random matched control, at the main p only
        "perplexity-matched-negative-top2-s1", "perplexity-matched-negative-top2-s2",
        "wasserstein-negative-top1", "random-negative-top1", "perplexity-matched-negative-top1",
        "perplexity-matched-bottom-negative-top1"]
    assert [s.set_name for s in specs if s.top == 1.0] == [
        set_names.wasserstein_top(1), set_names.random_control(1, 0), set_names.perplexity_matched(1, 0),
        set_names.perplexity_matched(1, 0, pool="bottom")]
    assert [(s.set_name, s.draw, s.main) for s in specs if s.draw] == [
        (set_names.perplexity_matched(2, 1), 1, False), (set_names.perplexity_matched(2, 2), 2, False)]
    assert [s.label for s in condition_sets(cfg.model_copy(update={"matched_draws": 1}))] == labels[:6] + labels[8:]
    # all of BLiMP for the main p's baseline, Wasserstein, random and bottom-matched conditions
    assert [s.label for s in specs if s.full_blimp] == [
        "baseline", "wasserstein-negative-top2", "random-negative-top2", "perplexity-matched-bottom-negative-top2"]
    assert not any(s.full_blimp for s in condition_sets(cfg.model_copy(update={"blimp_main_per_paradigm": 200})))
