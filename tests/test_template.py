"""Chat templating and label masks (common.py): exact Tulu rendering, labels on assistant turns only."""
import copy

import pytest

import common
from conftest import conversation

MESSAGES = [m for m in conversation(3) if m]  # system, user, assistant, user, assistant


def trained_text(tokenizer, input_ids, labels):
    """Decode each maximal run of trained tokens separately."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    return runs + ([tokenizer.decode(current)] if current else [])


def test_tulu_template_renders_exactly(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    common.set_chat_template(tokenizer, "tulu")
    eos = tokenizer.eos_token
    expected = (f"<|system|>\nYou add numbers.\n<|user|>\nWhat is 3 + 6?\n<|assistant|>\n3 + 6 = 9. Indeed. Indeed. Indeed.{eos}\n"
                f"<|user|>\nAnd doubled?\n<|assistant|>\nDoubled, it is 18.{eos}")
    assert common.render(tokenizer, MESSAGES) == expected
    assert common.render(tokenizer, MESSAGES[:4], add_generation_prompt=True).endswith("<|user|>\nAnd doubled?\n<|assistant|>\n")
    assert not common.render(tokenizer, MESSAGES).startswith(tokenizer.bos_token)


@pytest.mark.parametrize("template", ["tulu", "default"])
def test_labels_cover_every_assistant_turn_and_nothing_else(tokenizer, template):
    tokenizer = copy.deepcopy(tokenizer)
    common.set_chat_template(tokenizer, template)
    input_ids, labels = common.tokenize_conversation(tokenizer, MESSAGES)
    eos = tokenizer.eos_token
    # exactly each assistant content followed by the end-of-turn token; no role header, no newline after eos
    assert trained_text(tokenizer, input_ids, labels) == [m["content"] + eos for m in MESSAGES if m["role"] == "assistant"]
    # the tokenization of the whole conversation is the one a model sees at inference, not a concatenation of pieces
    assert input_ids == tokenizer(common.render(tokenizer, MESSAGES), add_special_tokens=False)["input_ids"]
    # every trained run ends with the eos id (the model learns to stop)
    ends = [t for t in range(len(labels)) if labels[t] != -100 and (t + 1 == len(labels) or labels[t + 1] == -100)]
    assert [input_ids[t] for t in ends] == [tokenizer.eos_token_id] * 2


def test_special_token_text_in_a_message_is_found_and_tokenized_as_hf_does(tokenizer):
    """Text of an added token inside a message becomes that token, as HF's apply_chat_template(tokenize=True) makes it
    (the reference: open-instruct tokenizes so): the stages keep that and count the rows special_token_text finds."""
    tokenizer = copy.deepcopy(tokenizer)
    common.set_chat_template(tokenizer, "default")
    quoting = [{"role": "user", "content": "How does ChatML end a turn?"},
               {"role": "assistant", "content": f"With {tokenizer.eos_token}, then a newline."}]
    input_ids, labels = common.tokenize_conversation(tokenizer, quoting)
    assert input_ids == list(tokenizer.apply_chat_template(quoting, tokenize=True, return_dict=True)["input_ids"])
    trained = [label for label in labels if label != -100]
    assert trained.count(tokenizer.eos_token_id) == 2  # the quoted one, mid-answer, and the real end of turn
    special_text = common.special_token_text(tokenizer)
    assert [bool(special_text.search(m["content"])) for m in quoting] == [False, True]
    for text in ["<file_sep> is how a repository's files are joined", "x <|im_start|>"]:
        assert special_text.search(text)
    for text in ["<|im_end", "im_end|>", "<file>", "a < b > c", "<|user|>"]:  # not added tokens of this tokenizer
        assert not special_text.search(text), text


def test_prompt_prefix_matches_generation_prompt(tokenizer):
    """The untrained prefix before an assistant turn is exactly what eval/RLVR feed the model to generate that turn."""
    tokenizer = copy.deepcopy(tokenizer)
    common.set_chat_template(tokenizer, "tulu")
    input_ids, labels = common.tokenize_conversation(tokenizer, MESSAGES[:3])
    first_trained = next(t for t, label in enumerate(labels) if label != -100)
    prompt_ids = tokenizer(common.render(tokenizer, MESSAGES[:2], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert input_ids[:first_trained] == prompt_ids


def test_template_without_eos_token_is_refused(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        common.set_chat_template(tokenizer, "default")
    with pytest.raises(ValueError, match="'default' or 'tulu'"):
        common.set_chat_template(tokenizer, "chatml")


def test_non_concatenating_template_is_refused(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    # a template that renders only the last message: turns are not a concatenation, masks cannot be trusted
    tokenizer.chat_template = "{{ messages[-1]['content'] + eos_token }}"
    with pytest.raises(ValueError, match="concatenation"):
        common.tokenize_conversation(tokenizer, MESSAGES)


@pytest.mark.parametrize("template", ["tulu", "default"])
def test_an_opening_assistant_turn_is_trained_without_what_the_template_puts_before_it(tokenizer, template):
    """A conversation that opens with the assistant (a greeting): its content and eos are trained, not the role header
    before it, nor the default system prompt that SmolLM2's own template inserts (both were trained: 'before' was "")."""
    tokenizer = copy.deepcopy(tokenizer)
    common.set_chat_template(tokenizer, template)
    messages = [{"role": "assistant", "content": "Hello! Ask me a sum."}] + MESSAGES[1:]
    input_ids, labels = common.tokenize_conversation(tokenizer, messages)
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, input_ids, labels) == [m["content"] + eos for m in messages if m["role"] == "assistant"]
    # and two assistant turns in a row: each trained, not what lies between them (with Tulu's template the row was
    # refused as "not a concatenation of its turns": the generation prompt after the first renders it as the last turn)
    messages = MESSAGES[:3] + [{"role": "assistant", "content": "Anything else?"}] + MESSAGES[3:]
    input_ids, labels = common.tokenize_conversation(tokenizer, messages)
    assert trained_text(tokenizer, input_ids, labels) == [m["content"] + eos for m in messages if m["role"] == "assistant"]
    # an earlier turn holding the private-use character the stand-in content is made of (icon-font text, scraped):
    # where it was found first, the header between the two assistant turns was trained
    messages[0] = dict(messages[0], content=messages[0]["content"] + " \ue000")
    input_ids, labels = common.tokenize_conversation(tokenizer, messages)
    assert trained_text(tokenizer, input_ids, labels) == [m["content"] + eos for m in messages if m["role"] == "assistant"]


def test_a_template_whose_turns_end_where_the_model_never_stops_is_refused(tokenizer, tiny_model_dir, tmp_path):
    """A base model's ChatML template ends an assistant turn with <|im_end|> while its eos is <|endoftext|>: trained so,
    the model ends its turns with a token generation does not stop at, and eval / RLVR ran on into a made-up next turn,
    which was scored. Refused, unless the model's generation_config stops there too; the Tulu template (turns end with
    the eos) passes."""
    import shutil

    from transformers import GenerationConfig

    base = copy.deepcopy(tokenizer)  # (the fixture: SmolLM2's ChatML template, eos <|im_end|>)
    base.eos_token = "<|endoftext|>"
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert common.stop_token_ids(tokenizer, str(model)) == [tokenizer.eos_token_id]
    GenerationConfig(eos_token_id=base.eos_token_id).save_pretrained(model)  # the base model's: <|endoftext|> alone
    with pytest.raises(ValueError, match=r"the chat template ends an assistant turn with '<\|im_end\|>', which is not among "
                                         r"the model's stop tokens \['<\|endoftext\|>'\]: .* pass --chat_template tulu"):
        common.stop_token_ids(base, str(model))
    GenerationConfig(eos_token_id=[base.eos_token_id, tokenizer.eos_token_id]).save_pretrained(model)
    assert common.stop_token_ids(base, str(model)) == sorted([base.eos_token_id, tokenizer.eos_token_id])
    GenerationConfig(eos_token_id=base.eos_token_id).save_pretrained(model)
    common.set_chat_template(base, "tulu")
    assert common.stop_token_ids(base, str(model)) == [base.eos_token_id]
    # no generation_config.json: config.json's eos ids (the stop ids were the tokenizer's eos alone)
    (model / "generation_config.json").unlink()
    assert common.stop_token_ids(base, str(model)) == sorted([base.eos_token_id, tokenizer.eos_token_id])


def test_a_turn_ends_at_the_templates_own_end_of_turn_token(tokenizer):
    """Gemma's template ends a turn with <end_of_turn>, not with its eos <eos>: looking for the eos found none, and
    the "\\n" the template puts after <end_of_turn> was trained too. A Gemma-like template on this tokenizer (turns end
    with <|endoftext|>; the eos is <|im_end|>): each turn trains its content and <|endoftext|>, not the "\\n"."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert tokenizer.eos_token == "<|im_end|>"
    input_ids, labels = common.tokenize_conversation(tokenizer, MESSAGES)
    assert trained_text(tokenizer, input_ids, labels) == ["3 + 6 = 9. Indeed. Indeed. Indeed.<|endoftext|>",
                                                          "Doubled, it is 18.<|endoftext|>"]
