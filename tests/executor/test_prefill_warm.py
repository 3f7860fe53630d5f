"""The warm-up's prefill attention probes (model_runner.prefill_warm_probes) reach every tile configuration that
default_prefill_config can choose for a step, so no variant is left to compile while serving (on the H200 two
were: 0.64 s each under the first burst of 1k-token prompts)."""

from __future__ import annotations

import pytest

from pagedserve.executor.model_runner import prefill_warm_probes


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("queries_per_kv", [1, 2, 4, 7, 8])
def test_probes_cover_every_config_a_step_can_pick(head_dim, queries_per_kv):
    from pagedserve.executor.kernels.paged_attention_prefill import default_prefill_config

    def key(max_query_len, max_seq_len):
        config = default_prefill_config(head_dim, max_query_len, queries_per_kv, max_seq_len)
        return config["block_m"], config["block_n"], config["num_warps"], config["num_stages"]

    probes = prefill_warm_probes(head_dim, queries_per_kv)
    warmed = {key(q, keys) for keys, q in probes}
    seen = {key(q, keys) for q in range(1, 8193) for keys in (q, q + 100, 2048, 4096, 32768) if keys >= q}
    assert seen <= warmed, f"not warmed: {sorted(seen - warmed)}"
    assert len(warmed) == len(probes) >= 2  # one launch a configuration
