import pytest

from sparsellm.errors import SparseLLMError
from sparsellm.eval.suite import ALL_TASKS, GROUPS, resolve_tasks


def test_groups_and_all_expand_in_order_without_repeats():
    assert resolve_tasks("passkey,longctx") == ("passkey", "needle", "vartrack")
    assert resolve_tasks("knowledge") == ("naturalqs_open", "jeopardy", "squad", "coqa")
    assert len(GROUPS["zeroshot"]) == 9
    assert resolve_tasks("all") == ALL_TASKS
    assert resolve_tasks("") == ()


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(SparseLLMError, match="unknown task 'mmlu'; valid tasks: arc_easy"):
        resolve_tasks("arc_easy,mmlu")
