"""service/serving/budget.py: one budget per request, context = prompt + thinking + answer."""

from __future__ import annotations

import pytest

from service.api.errors import APIError
from service.serving.budget import DEFAULT_ANSWER_RESERVE, TokenBudget


def test_answer_without_max_tokens_takes_the_rest_up_to_the_default():
    b = TokenBudget(1000, None, 300, thinking=200)
    assert b.answer_tokens(100) == 300  # default cap
    assert b.answer_tokens(600) == 200  # the rest of the context after prompt and thinking
    assert b.room_for_prompt() == 1000 - 200 - min(300, DEFAULT_ANSWER_RESERVE)


def test_explicit_max_tokens_is_never_clamped():
    b = TokenBudget(1000, 300, 512, thinking=200)
    assert b.answer_tokens(500) == 300
    with pytest.raises(APIError) as e:
        b.answer_tokens(501)  # 501 + 200 + 300 > 1000
    assert e.value.status == 400 and e.value.param == "max_tokens" and "200 for thinking" in e.value.message


def test_prompt_and_thinking_must_fit():
    with pytest.raises(APIError) as e:
        TokenBudget(1000, None, 512).answer_tokens(1000)
    assert e.value.param == "messages"
    with pytest.raises(APIError) as e:
        TokenBudget(1000, None, 512, thinking=600).answer_tokens(400)
    assert e.value.param == "reasoning.max_tokens"
