"""`rewrite_query` of vector store search: questions become their content words; the search then runs on those."""

import openai
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


def test_search_with_rewrite_query_searches_and_reports_the_rewritten_query(client: openai.OpenAI,
                                                                             marker: str) -> None:
    store = client.vector_stores.create(name="handbook")
    vs_file = client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=(
        "handbook.txt", f"Employees get 27 paid vacation days a year. {marker}".encode(), "text/plain"))
    assert vs_file.status == "completed", vs_file.last_error
    question = "Could you tell me how many paid vacation days employees get?"

    results = list(client.vector_stores.search(store.id, query=question, rewrite_query=True))
    one = client.vector_stores.with_raw_response.search(store.id, query=question,
                                                        rewrite_query=True).http_response.json()
    raw = client.vector_stores.with_raw_response.search(store.id, query=[question, "Vacation?"],
                                                        rewrite_query=True).http_response.json()
    plain = client.vector_stores.with_raw_response.search(store.id, query=question).http_response.json()

    assert [r.file_id for r in results] == [vs_file.id] and marker in results[0].content[0].text
    assert one["search_query"] == ["many paid vacation days employees get"]
    assert raw["search_query"] == ["many paid vacation days employees get", "vacation"]
    assert plain["search_query"] == [question]  # not asked: the query as given
