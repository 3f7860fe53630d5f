"""The decode graphs' batch-size ladder (no GPU needed)."""

from __future__ import annotations

import pytest

from pagedserve.executor.cuda_graph import batch_size_ladder


@pytest.mark.parametrize("max_num_seqs", [1, 7, 64, 100, 192, 200, 256, 1024])
def test_every_batch_has_a_graph_and_the_largest_is_max_num_seqs(max_num_seqs):
    sizes = batch_size_ladder(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
    for batch in range(1, max_num_seqs + 1):
        assert any(s >= batch for s in sizes)


def test_no_graph_at_the_batches_where_cublas_costs_as_much_as_a_larger_one():
    sizes = batch_size_ladder(256)
    assert 192 not in sizes and 240 not in sizes
    assert min(s for s in sizes if s >= 177) == 200 and min(s for s in sizes if s >= 225) == 256
