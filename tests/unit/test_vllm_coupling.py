"""The installed vLLM still has every private detail vllm_kvp relies on (vllm_kvp.engine.vllm_compat).

One test runs every touch point's check and fails with the list of all that changed, so a vLLM
upgrade shows up as that list rather than as a hang inside a multi-rank engine. Another keeps
the ledger (patches/README.md) equal to the touch point records.
"""

from __future__ import annotations

import pathlib
import re

from vllm_kvp.engine import vllm_compat as compat

LEDGER = pathlib.Path(__file__).resolve().parents[2] / "patches" / "README.md"


def test_every_touch_point_holds_on_the_installed_vllm():
    problems = compat.check_all()
    assert not problems, "vLLM touch points that changed:\n  " + "\n  ".join(problems)


def test_every_touch_point_has_its_ledger_row():
    text = LEDGER.read_text()
    missing = [row for row in compat.ledger_rows() if row not in text]
    assert not missing, ("patches/README.md is out of date (regenerate the table with "
                         "`python -m vllm_kvp.engine.vllm_compat`); rows missing:\n" + "\n".join(missing))


def test_ledger_has_no_stale_touch_point_rows():
    text = LEDGER.read_text()
    table = text[text.index("## Private touch points"):]
    named = set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))
    assert named == {tp.name for tp in compat.TOUCH_POINTS}


def test_touch_point_names_are_unique():
    names = [tp.name for tp in compat.TOUCH_POINTS]
    assert len(names) == len(set(names))


def test_a_changed_signature_is_reported():
    # The helpers the checks are built from do report a mismatch (here on a function of ours).
    problems = compat._params("vllm_kvp.engine.vllm_compat:allocate_slots_args",
                              ["request", "num_new_tokens", "kwargs"])
    assert problems and "allocate_slots_args" in problems[0]
    assert compat._contains("vllm_kvp.engine.vllm_compat", "blocks_held", "no such text")


def test_allocate_slots_args_by_position_and_keyword():
    # vLLM's scheduler passes the lookahead by keyword and the prefix hits by keyword or position.
    a = compat.allocate_slots_args("req", 5, (3, "hits"), {"num_lookahead_tokens": 2})
    assert (a["request"], a["num_new_tokens"]) == ("req", 5)
    assert (a["num_new_computed_tokens"], a["new_computed_blocks"]) == (3, "hits")
    assert (a["num_lookahead_tokens"], a["num_external_computed_tokens"]) == (2, 0)


def test_ranked_free_queue_implements_what_the_pool_calls():
    from vllm_kvp.engine.rank_pool import RankedFreeQueue

    assert [m for m in compat.FREE_QUEUE_METHODS if not hasattr(RankedFreeQueue, m)] == []


def test_kvp_group_name_takes_the_shared_memory_path():
    assert compat.KVP_GROUP_NAME.startswith(("tp", "pp"))


def test_wrapped_cpu_gemm_dispatch_is_restored():
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    with compat.wrapped_cpu_gemm_dispatch(lambda orig: ("wrapped", orig)):
        assert utils.dispatch_cpu_unquantized_gemm == ("wrapped", original)
    assert utils.dispatch_cpu_unquantized_gemm is original
