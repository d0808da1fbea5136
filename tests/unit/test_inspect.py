from vllm_kvp.inspect import RankSpan, rank_span


class _Output:
    def __init__(self, params):
        self.kv_transfer_params = params


def test_rank_span_reads_kvp_params():
    span = rank_span(_Output({"kvp_ranks": [2, 0], "kvp_rank_starts": [0, 4096]}))
    assert span == RankSpan([2, 0], [0, 4096]) and span.num_ranks == 2
    assert rank_span({"kvp_ranks": [1], "kvp_rank_starts": [0]}).ranks == [1]


def test_rank_span_none_without_kvp():
    assert rank_span(_Output(None)) is None
    assert rank_span(_Output({"remote_block_ids": [1]})) is None
