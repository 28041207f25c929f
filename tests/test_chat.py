"""The chat format: role markers, loss only on assistant turns, the same ids as the HF template."""

from __future__ import annotations

import json

import pytest

from kiln.data.chat import CHAT_TEMPLATE, IGNORE, check_messages, render, render_text
from kiln.data.tokenizer import load_tokenizer
from kiln.errors import KilnError

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Square of 3?"},
        {"role": "assistant", "content": "9"}, {"role": "user", "content": "And 4?"},
        {"role": "assistant", "content": "16"}]


def test_loss_is_only_on_assistant_content_and_end(prepared):
    tok = load_tokenizer(prepared / "tokenizer")
    r = render(tok, CONV)
    learned = tok.decode([t for t, lab in zip(r.ids, r.labels) if lab != IGNORE], skip_special_tokens=False)
    assert learned == "9<|end|>16<|end|>"
    assert all(lab in (IGNORE, t) for t, lab in zip(r.ids, r.labels))
    last = render(tok, CONV, train_on="last")
    assert tok.decode([t for t, lab in zip(last.ids, last.labels) if lab != IGNORE], skip_special_tokens=False) == "16<|end|>"


def test_ids_equal_the_rendered_string_and_the_jinja_template(prepared):
    jinja2 = pytest.importorskip("jinja2")
    tok = load_tokenizer(prepared / "tokenizer")
    text = jinja2.Template(CHAT_TEMPLATE).render(messages=CONV, bos_token="<|bos|>", add_generation_prompt=True)
    assert text == render_text(CONV, add_generation_prompt=True)
    assert tok.encode(text, add_special_tokens=False).ids == render(tok, CONV, add_generation_prompt=True).ids


@pytest.mark.parametrize("bad,msg", [
    ([], "non-empty list"), ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "  "}], "empty"), ([{"role": "user"}], "'role' and 'content'"),
])
def test_malformed_conversations_get_one_line(bad, msg):
    with pytest.raises(KilnError, match=msg):
        check_messages(bad, "data.jsonl line 3")


def test_the_developer_role_is_the_system_role_everywhere_a_conversation_is_read(tmp_path):
    """OpenAI's clients send `developer` for the system turn: SFT data, preference pairs and RL
    prompts read it as the server does, rendered as kiln's system turn."""
    from kiln.data.chat import check_messages
    from kiln.data.chat_data import ChatStats, read_conversations

    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    assert [m["role"] for m in check_messages([dict(m) for m in messages])] == ["system", "user", "assistant"]
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"messages": messages}) + "\n")
    stats = ChatStats()
    assert [m["role"] for m in read_conversations(f, stats)[0]] == ["system", "user", "assistant"]
