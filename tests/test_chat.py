"""Chat templates rendered on the edge (jinja2, no transformers) equal transformers' apply_chat_template."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from edge.chat import ChatError, ChatTemplate, load_messages

# ChatML as Qwen2.5 ships it (a default system prompt, the assistant header on request).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-2 chat: BOS from the special tokens, strict alternation enforced with raise_exception.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# The same in the multi-line layout real templates use: trim_blocks / lstrip_blocks decide the output.
CHATML_MULTILINE = """{%- for message in messages %}
    {%- if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {% if message['role'] == 'user' %}
{{ '<|im_start|>user\\n' + message['content'] | tojson + '<|im_end|>\\n' }}
    {% else %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' }}
{% endif %}
"""
CONVERSATIONS = [
    [{"role": "user", "content": "Q:7+5-3+8 A:"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 3+4?"},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "And \"3*4\" <tag> é?"}],
]


@pytest.fixture(scope="module", params=[("chatml", CHATML), ("chatml-multiline", CHATML_MULTILINE), ("llama2", LLAMA2)], ids=lambda p: p[0])
def chat_folder(request, tmp_path_factory, demo_slm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_slm_dir)
    tok.chat_template = request.param[1]
    folder = tmp_path_factory.mktemp(request.param[0])
    tok.save_pretrained(folder)
    return folder, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_equals_transformers(chat_folder, messages, generation_prompt):
    folder, tok = chat_folder
    text = ChatTemplate.from_folder(folder).render(messages, add_generation_prompt=generation_prompt)
    assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert ids == tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)


def test_template_errors_are_one_line(tmp_path, demo_slm_dir):
    from transformers import AutoTokenizer

    with pytest.raises(ChatError, match="no chat template"):
        ChatTemplate.from_folder(demo_slm_dir)  # the demo pair is not a chat model
    tok = AutoTokenizer.from_pretrained(demo_slm_dir)
    tok.chat_template = LLAMA2
    tok.save_pretrained(tmp_path)
    template = ChatTemplate.from_folder(tmp_path)
    with pytest.raises(ChatError, match="alternate"):
        template.render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ChatError, match="message 0"):
        template.render([{"role": "user"}])


def test_named_templates(tmp_path):
    config = {"chat_template": [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
                                {"name": "tool_use", "template": "T{{ messages[0]['content'] }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    msgs = [{"role": "user", "content": "x"}]
    assert ChatTemplate.from_folder(tmp_path).render(msgs) == "Dx"
    assert ChatTemplate.from_folder(tmp_path, "tool_use").render(msgs) == "Tx"
    with pytest.raises(ChatError, match="not 'rag'"):
        ChatTemplate.from_folder(tmp_path, "rag")


@pytest.mark.parametrize("content,match", [
    ("not json", "cannot read"),
    ("[]", "non-empty"),
    ('{"role": "user", "content": "x"}', "non-empty JSON list"),
    ('[{"role": "user", "content": 3}]', "message 0"),
])
def test_bad_messages_files(tmp_path, content, match):
    path = tmp_path / "messages.json"
    path.write_text(content)
    with pytest.raises(ChatError, match=match):
        load_messages(path)


def test_generate_with_chat_and_messages(slm_onnx, tmp_path):
    """`edge generate --chat/--messages` renders the export's template and prints the rendered prompt first."""
    import shutil

    from tests.conftest import run_module

    folder = tmp_path / "chat-export"
    shutil.copytree(slm_onnx, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    expected = ChatTemplate.from_folder(folder).render(CONVERSATIONS[0])
    proc = run_module("edge", "generate", "--model", str(folder), "--chat", CONVERSATIONS[0][0]["content"],
                      "--temperature", "0", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(expected)
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps(CONVERSATIONS[1]))
    proc = run_module("edge", "generate", "--model", str(folder), "--messages", str(messages),
                      "--temperature", "0", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(ChatTemplate.from_folder(folder).render(CONVERSATIONS[1]))
    proc = run_module("edge", "generate", "--model", str(slm_onnx), "--chat", "hi")
    assert proc.returncode == 2 and "no chat template" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_module("edge", "generate", "--model", str(slm_onnx), "--chat", "hi", "--prompt", "x")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
