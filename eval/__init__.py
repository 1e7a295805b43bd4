"""Client-side evaluation harness for vllm-negablate.

Loads the minimal-pair benchmarks (BLiMP, TSE) and held-out text, and computes
accuracies and paired statistics. It talks to a running server over HTTP and
never imports torch or vllm.
"""
