"""`rewrite_query` of vector store search: questions become their content words; the search then runs on those."""

import pytest

from threadline_search.rewrite import rewrite_query


@pytest.mark.parametrize(("query", "rewritten"), [
    ("I'd like to know the height of the main office building.", "height main office building"),
    ("Can you tell me what the refund policy is for orders not shipped?", "refund policy orders not shipped"),
    ("Please, how many vacation days do employees get?", "many vacation days employees get"),
    ("What is the e-mail retention at 10.5% per year?", "e-mail retention 10.5 per year"),
    ("Kiwis? KIWIS! kiwis.", "kiwis"),
    ("vacation days", "vacation days"),
])
def test_questions_become_their_content_words(query: str, rewritten: str) -> None:
    assert rewrite_query(query) == rewritten


@pytest.mark.parametrize("query", ["the", "What is it?", "?!"])
def test_a_query_of_only_function_words_is_kept(query: str) -> None:
    assert rewrite_query(query) == query.strip()


def test_other_scripts_keep_their_words() -> None:
    assert rewrite_query("Wie viele Urlaubstage gibt es?") == "wie viele urlaubstage gibt es"
    assert rewrite_query("年假有多少天\uff1f") == "年假有多少天"
