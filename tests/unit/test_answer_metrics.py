"""Scorers of generated answers and the cut of held-out rows into prompt + reference."""

from __future__ import annotations

import numpy as np
import pytest

from peftkit.data.encode import IGNORE, EncodedRow
from peftkit.errors import RecipeError
from peftkit.objectives import answer_metrics as m
from peftkit.recipe.load import validate_recipe
from peftkit.training.generated import held_out_answers

REF = '{"name": "Ada Byron", "quantity": 2, "city": "Vienna"}'


def test_json_fields_needs_every_field_right_with_its_json_type():
    assert m.json_fields(REF, REF)["score"] == 1.0
    prose = 'Sure! {"name": "Ada Byron", "quantity": 2, "city": "Vienna"} Anything else?'
    assert m.json_fields(prose, REF)["score"] == 1.0  # the first JSON object counts
    quoted = m.json_fields('{"name": "Ada Byron", "quantity": "2", "city": "Vienna"}', REF)
    assert quoted["score"] == 0.0 and quoted["field_accuracy"] == pytest.approx(2 / 3)
    extra = m.json_fields('{"name": "Ada Byron", "quantity": 2, "city": "Vienna", "x": 1}', REF)
    assert extra["score"] == 0.0 and extra["field_accuracy"] == 1.0
    broken = m.json_fields('{"name": "Ada Byron", "quantity": 2', REF)
    assert broken == {"score": 0.0, "field_accuracy": 0.0, "json_parsed": 0.0}


def test_first_json_object_skips_non_objects_and_broken_braces():
    assert m.first_json_object('[1] {oops} {"a": 1} {"b": 2}') == {"a": 1}
    assert m.first_json_object("no json") is None


def test_exact_and_contains():
    assert m.exact(" 42 ", "42")["score"] == 1.0 and m.exact("42.", "42")["score"] == 0.0
    assert m.contains("The answer is Paris.", "paris")["score"] == 1.0
    assert m.contains("Lyon", "Paris")["score"] == 0.0


def test_user_function_from_a_file(tmp_path):
    (tmp_path / "score.py").write_text(
        "def starts(answer, ref):\n    return answer[:1] == ref[:1]\n"
    )
    scorer = m.load_function(f"{tmp_path / 'score.py'}:starts")
    assert scorer("abc", "axe") == {"score": 1.0} and scorer("b", "a") == {"score": 0.0}
    with pytest.raises(RecipeError, match="has no function 'nope'"):
        m.load_function(f"{tmp_path / 'score.py'}:nope")
    with pytest.raises(RecipeError, match="module:function"):
        m.load_function("just_a_name")


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and i == 99))


def _row(ids, supervised):
    ids = np.array(ids)
    labels = np.where(np.isin(np.arange(len(ids)), supervised), ids, IGNORE)
    return EncodedRow(ids, labels, "test")


def test_held_out_rows_are_cut_before_their_last_supervised_span():
    two_turns = _row([1, 2, 3, 4, 99, 5, 6, 7, 99], supervised=[3, 4, 7, 8])
    items = held_out_answers([two_turns, _row([1, 2, 3], supervised=[])], _Tok())
    assert len(items) == 1  # a row with nothing supervised has no answer to score
    assert items[0].prompt_ids == [1, 2, 3, 4, 99, 5, 6] and items[0].reference == "7"


def test_eval_metric_rules_name_the_key_to_change():
    base = {
        "model": {"name": "m"},
        "adapter": {"method": "lora"},
        "data": {"train": "t.jsonl"},
    }
    with pytest.raises(RecipeError, match=r"eval\.metric json_fields scores answers to held-out"):
        validate_recipe({**base, "eval": {"metric": "json_fields"}})
    with pytest.raises(RecipeError, match=r"eval\.metric python needs eval\.function"):
        validate_recipe(
            {**base, "data": {"train": "t.jsonl", "eval": "e.jsonl"}, "eval": {"metric": "python"}}
        )
    with pytest.raises(RecipeError, match=r"set eval\.metric: python"):
        validate_recipe({**base, "eval": {"function": "m:f"}})


HERMES_T = "{{ tools | tojson }} <tool_call></tool_call>"
WEATHER = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
)


def test_tool_call_needs_the_name_and_exactly_the_arguments():
    metric = m.ToolCallMetric(HERMES_T)
    assert metric(WEATHER, WEATHER) == {
        "score": 1.0,
        "name_accuracy": 1.0,
        "field_accuracy": 1.0,
        "call_parsed": 1.0,
    }
    one_wrong = WEATHER.replace('"days": 2', '"days": "2"')  # JSON types count
    assert metric(one_wrong, WEATHER) == {
        "score": 0.0,
        "name_accuracy": 1.0,
        "field_accuracy": 0.5,
        "call_parsed": 1.0,
    }
    renamed = WEATHER.replace("get_weather", "get_time")
    assert metric(renamed, WEATHER)["name_accuracy"] == 0.0
    assert metric(renamed, WEATHER)["score"] == 0.0
    assert metric("It is sunny in Paris.", WEATHER) == {
        "score": 0.0,
        "name_accuracy": 0.0,
        "field_accuracy": 0.0,
        "call_parsed": 0.0,
    }
    twice = WEATHER + WEATHER
    assert metric(WEATHER, twice)["score"] == 0.0  # one call of the two
    assert metric(WEATHER, twice)["field_accuracy"] == 0.5
    no_args = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    assert metric(no_args, no_args)["field_accuracy"] == 1.0
    # a reasoning template: the <think> block before the call is not the call
    thinking = m.ToolCallMetric(HERMES_T + "<think>")
    assert thinking("<think>Paris, 2 days</think>" + WEATHER, WEATHER)["score"] == 1.0
    assert metric.applies(WEATHER) and not metric.applies("plain answer")


def test_tool_call_needs_a_template_with_a_known_call_format():
    with pytest.raises(RecipeError, match=r"eval\.metric tool_call: the chat template writes"):
        m.ToolCallMetric("{% for m in messages %}{{ m.content }}{% endfor %}")


class _TextTok:
    """Decodes each id to one of a few texts: a tool-call answer, a plain one, a prompt."""

    chat_template = HERMES_T
    texts = {1: "prompt", 2: WEATHER, 3: "plain answer"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.texts[int(i)] for i in ids)


def test_tool_call_scores_only_rows_whose_answer_is_a_call():
    from peftkit.errors import DataError
    from peftkit.recipe.schema import EvalSpec
    from peftkit.training.generated import AnswerEval

    spec = EvalSpec(metric="tool_call")
    rows = [_row([1, 2], supervised=[1]), _row([1, 3], supervised=[1])]
    evaluation = AnswerEval(spec, rows, _TextTok(), [0])
    assert [item.reference for item in evaluation.items] == [WEATHER]
    assert isinstance(evaluation.scorer, m.ToolCallMetric)
    with pytest.raises(
        DataError, match="none of the 1 held-out rows scored has an assistant turn that calls"
    ):
        AnswerEval(spec, rows[1:], _TextTok(), [0])


def test_tool_call_scores_the_turn_that_calls_not_the_confirmation_after_it():
    from peftkit.recipe.schema import EvalSpec
    from peftkit.training.generated import AnswerEval

    # prompt, the call (supervised), the tool's result (not), the confirmation (supervised)
    agent_chat = _row([1, 2, 1, 3], supervised=[1, 3])
    (item,) = AnswerEval(EvalSpec(metric="tool_call"), [agent_chat], _TextTok(), [0]).items
    assert item.reference == WEATHER and item.prompt_ids == [1]
    (last,) = held_out_answers([agent_chat], _TextTok())  # other metrics: the last turn
    assert last.reference == "plain answer" and last.prompt_ids == [1, 2, 1]


def test_peftkit_fallback_template_is_the_hermes_call_format():
    from peftkit.data.chat import FALLBACK_TEMPLATE
    from peftkit.data.tool_calls import detect_family

    assert detect_family(FALLBACK_TEMPLATE) == "hermes"
    metric = m.ToolCallMetric(FALLBACK_TEMPLATE)
    compact = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
    assert metric(compact + "</tool_call>", WEATHER)["score"] == 1.0
