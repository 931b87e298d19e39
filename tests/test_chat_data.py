"""SFT chat data: GLM-5 rendering and its per-token loss mask, whole-conversation packing, overlong conversations,
exact resume, the Jinja path against transformers' apply_chat_template, bad chat input as one line."""

from __future__ import annotations

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from glm5_jax.data import config as data_config
from glm5_jax.data import errors
from glm5_jax.data.chat import ChatEncoder, GLMRenderer, parse_messages
from glm5_jax.data.chat_template import TemplateRenderer
from glm5_jax.data.errors import ErrorPolicy
from glm5_jax.data.loader import DataPipeline, restore_args, save_args
from glm5_jax.data.packing import IGNORE, KEYS
from glm5_jax.data.tokenizer import CHAT_TOKENS, ByteTokenizer, HFTokenizer, train_bpe
from glm5_jax.errors import ConfigError, DataError

TOK = ByteTokenizer()
RENDER = GLMRenderer(TOK)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "reasoning_content": "Ask the tool.",
     "tool_calls": [{"function": {"name": "weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
    {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "Rain."},
]
EXPECTED = ("[gMASK]<sop><|system|>Be brief.<|user|>Weather in Oslo?<|assistant|><think>Ask the tool.</think>"
            "<tool_call>weather<arg_key>city</arg_key><arg_value>Oslo</arg_value><arg_key>days</arg_key>"
            "<arg_value>2</arg_value></tool_call><|observation|><tool_response>rain</tool_response>"
            "<|assistant|><think></think>Rain.")


def scored_runs(ids, scored) -> list[str]:
    cuts = np.flatnonzero(np.diff(scored.astype(np.int8))) + 1
    return [TOK.decode(ids[r]) + ("<eos>" if ids[r[-1]] == TOK.eos_id else "")
            for r in np.split(np.arange(len(ids)), cuts) if scored[r[0]]]


def test_renders_glm5_format_exactly():
    ids, scored = RENDER.render(parse_messages(CONVERSATION))
    assert TOK.decode(ids) == EXPECTED and ids[-1] == TOK.eos_id
    assert [TOK.special_id(t) for t in CHAT_TOKENS] == list(range(259, 275)) and TOK.vocab_size == 275
    sp = TOK.special_id
    head = [sp("[gMASK]"), sp("<sop>"), sp("<|system|>"), *TOK.encode("Be brief."), sp("<|user|>")]
    np.testing.assert_array_equal(ids[:len(head)], head)
    assert list(ids[-9:]) == [sp("<|assistant|>"), sp("<think>"), sp("</think>"), *TOK.encode("Rain."), TOK.eos_id]
    # scored: each assistant message after its role token, and the token that closes it
    assert scored_runs(ids, scored) == [
        "<think>Ask the tool.</think><tool_call>weather<arg_key>city</arg_key><arg_value>Oslo</arg_value><arg_key>"
        "days</arg_key><arg_value>2</arg_value></tool_call><|observation|>", "<think></think>Rain.<eos>"]
    np.testing.assert_array_equal(TOK.encode("plain text") - 3, np.frombuffer(b"plain text", np.uint8))


def test_mask_counts():
    def count(messages):
        return int(RENDER.render(parse_messages(messages))[1].sum())

    base = count(CONVERSATION)
    same_length = [dict(m, content=m["content"].upper()) if m["role"] in ("system", "user", "tool") else m
                   for m in CONVERSATION]
    assert same_length != CONVERSATION and count(same_length) == base
    off = [*CONVERSATION[:4], dict(CONVERSATION[4], loss=False)]
    assert base - count(off) == 2 + len(TOK.encode("Rain.")) + 1  # <think></think>, content, the closing EOS


def write_chat(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def qa(i: int, turns: int = 1) -> dict:
    msgs = []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"q{i}.{t} " + "x" * (i % 7)}, {"role": "assistant", "content": f"a{i}.{t}"}]
    return {"messages": msgs}


def chat_config(path, seq_len=64, rows=4, **extra):
    return data_config.from_dict({
        "sources": {"chat": {"kind": "jsonl", "format": "chat", "paths": [path], **extra.pop("source", {})}},
        "stages": [{"name": "sft", "seq_len": seq_len, "tokens_per_step": rows * seq_len, "tokens": 100 * rows * seq_len,
                    "mixture": {"chat": 1}}], "seed": 1, **extra})


def conversations(batches):
    """(ids of each packed conversation, its targets) in stream order."""
    out = []
    for b in batches:
        for r in range(len(b["input_ids"])):
            seg = b["segment_ids"][r]
            for c in range(1, int(seg.max()) + 1):
                where = np.flatnonzero(seg == c)
                np.testing.assert_array_equal(b["positions"][r, where], np.arange(len(where)))
                out.append((b["input_ids"][r, where], b["targets"][r, where]))
    return out


def test_packs_whole_conversations(tmp_path):
    records = [qa(i, 1 + i % 3) for i in range(30)]
    it = DataPipeline(chat_config(write_chat(tmp_path / "c.jsonl", records), seq_len=128), 0, 1).iterator()
    batches = [next(it) for _ in range(10)]
    for b in batches:
        assert set(b) == set(KEYS) and all(v.dtype == np.int32 and v.shape == (4, 128) for v in b.values())
    rendered = {RENDER.render(parse_messages(r["messages"]))[0].tobytes(): i for i, r in enumerate(records)}
    seen = set()
    for ids, targets in conversations(batches):  # each segment is one whole conversation, positions from 0
        i = rendered[ids.tobytes()]
        _, scored = RENDER.render(parse_messages(records[i]["messages"]))
        np.testing.assert_array_equal(targets, np.where(np.r_[scored[1:], False], np.r_[ids[1:], 0], IGNORE))
        seen.add(i)
    assert seen == set(range(30))


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [qa(i, 1 + i % 2)["messages"] for i in range(4)]
    records[3][1]["loss"] = False  # a struct column: the other rows' loss is null, i.e. scored
    pq.write_table(pa.table({"messages": records}), tmp_path / "c.parquet")
    cfg = chat_config(str(tmp_path / "c.parquet"), seq_len=128, shuffle=False)
    cfg.sources["chat"].kind = "parquet"
    got = conversations([next(DataPipeline(cfg, 0, 1).iterator())])
    for (ids, targets), messages in zip(got, records):
        ref_ids, scored = RENDER.render(parse_messages(messages))
        np.testing.assert_array_equal(ids, ref_ids)
        assert np.count_nonzero(targets != IGNORE) == scored.sum()


def test_overlong_truncate_and_drop():
    fits_first = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                  {"role": "user", "content": "y" * 80}, {"role": "assistant", "content": "ok"}]
    too_long = [{"role": "user", "content": "z" * 80}, {"role": "assistant", "content": "no"}]
    for mode, expected in (("truncate", {"truncated": 1, "dropped": 1}), ("drop", {"truncated": 0, "dropped": 2})):
        errors.reset_skipped_counts()
        encode = ChatEncoder("chat", TOK, ErrorPolicy("raise"), RENDER, 64, mode)
        first, second = encode(("c.jsonl:1", fits_first)), encode(("c.jsonl:2", too_long))
        assert second is None and errors.overlong_counts() == {"chat": expected}
        if mode == "truncate":  # cut after the first exchange, closed by EOS
            np.testing.assert_array_equal(first["input_ids"], RENDER.render(parse_messages(fits_first[:2]))[0])
        else:
            assert first is None


def test_resume_is_exact(tmp_path):
    path = write_chat(tmp_path / "c.jsonl", [qa(i, 1 + i % 2) for i in range(40)])
    cfg = chat_config(path)
    reference = [b for b, _ in zip(DataPipeline(cfg, 0, 1).iterator(), range(9))]
    it = DataPipeline(cfg, 0, 1).iterator()
    first = [next(it) for _ in range(4)]
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(4, args=ocp.args.Composite(data=save_args(it)))
    mngr.wait_until_finished()
    resumed = DataPipeline(cfg, 0, 1).iterator()  # a fresh process: new pipeline, iterator at step 0
    mngr.restore(4, args=ocp.args.Composite(data=restore_args(resumed)))
    assert resumed.step == 4
    for i, (a, b) in enumerate(zip(first + [next(resumed) for _ in range(5)], reference)):
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {i} {k}")


TEMPLATE = """[gMASK]<sop>
{%- for m in messages %}
    {%- if m.role == 'system' or m.role == 'user' %}<|{{ m.role }}|>{{ m.content }}
    {%- elif m.role == 'assistant' %}<|assistant|><think>{{ m.reasoning_content or '' }}</think>{{ m.content }}
        {%- for tc in m.tool_calls or [] %}<tool_call>{{ tc.function.name }}
            {%- for k, v in tc.function.arguments.items() %}<arg_key>{{ k }}</arg_key><arg_value>
            {{- v | tojson if v is not string else v }}</arg_value>{% endfor %}</tool_call>
        {%- endfor %}
    {%- elif m.role == 'tool' %}<|observation|><tool_response>{{ m.content }}</tool_response>
    {%- else %}{{ raise_exception('unknown role ' + m.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tokenizer folder as Hugging Face saves one: tokenizer.json with the chat markers as added tokens and a
    tokenizer_config.json carrying the chat template (built here; nothing is downloaded)."""
    from tokenizers import AddedToken, Tokenizer

    folder = tmp_path_factory.mktemp("tok")
    path = train_bpe(["Weather in Oslo? Be brief. Rain. Ask the tool.", "the city is Oslo"] * 20, 300,
                     str(folder / "tokenizer.json"))
    tok = Tokenizer.from_file(path)
    tok.add_special_tokens([AddedToken(t, special=True) for t in CHAT_TOKENS])
    tok.save(path)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE,
                                                              "eos_token": "<|endoftext|>"}))
    return folder


def test_template_matches_transformers(hf_folder):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_folder / "tokenizer.json"), eos_token="<|endoftext|>")
    ref.chat_template = TEMPLATE
    tok = HFTokenizer(str(hf_folder / "tokenizer.json"), eos_token="<|endoftext|>")
    renderer = TemplateRenderer(str(hf_folder), tok)
    messages = parse_messages(CONVERSATION)
    dicts = [m.as_dict() for m in messages]
    assert renderer.text(dicts) == ref.apply_chat_template(dicts, tokenize=False) == EXPECTED
    assert renderer.text(dicts[:2], True) == ref.apply_chat_template(dicts[:2], tokenize=False,
                                                                     add_generation_prompt=True)
    ids, scored = renderer.render(messages)
    assert list(ids[:-1]) == ref.apply_chat_template(dicts, tokenize=True, return_dict=False)
    # the prefix-derived mask equals the built-in renderer's with the same tokenizer, token for token
    builtin_ids, builtin_scored = GLMRenderer(tok).render(messages)
    np.testing.assert_array_equal(ids, builtin_ids)
    np.testing.assert_array_equal(scored, builtin_scored)


def bad_pipeline(tmp_path, records: list, tokenizer=None, **source):
    path = write_chat(tmp_path / "bad.jsonl", records)
    extra = {"tokenizer": tokenizer} if tokenizer else {}
    return DataPipeline(chat_config(path, on_error="raise", source=source, **extra), 0, 1)


@pytest.mark.parametrize("record,message", [
    ({"text": "hi"}, r"bad.jsonl:1: no list of messages in field 'messages'"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, r"bad.jsonl:1: messages.0.role: unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": False}]},
     r"bad.jsonl:1: no scored token"),
    ({"messages": [{"role": "assistant", "content": "y", "tool_calls": [{"name": "f", "arguments": "{"}]}]},
     r"bad.jsonl:1: messages.0.tool_calls.0.arguments is a string but not JSON"),
], ids=["no-messages", "unknown-role", "no-scored-token", "bad-arguments"])
def test_bad_records_are_one_line(tmp_path, record, message):
    with pytest.raises(DataError, match=message) as e:
        next(bad_pipeline(tmp_path, [record]).iterator())
    assert "\n" not in str(e.value)


def test_bad_template_and_tokens_are_one_line(tmp_path, hf_folder):
    hf = {"kind": "hf", "path": str(hf_folder / "tokenizer.json"), "eos_token": "<|endoftext|>"}
    template = tmp_path / "t.jinja"
    template.write_text("{{ raise_exception('no ' + messages[0].role) }}")
    with pytest.raises(DataError, match=r"no usable record .*bad.jsonl:1: the chat template failed to render: no user"):
        bad_pipeline(tmp_path, [qa(0)], template=str(template), tokenizer=hf)
    template.write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match=r"t.jinja: not a valid Jinja template \(line 1"):
        bad_pipeline(tmp_path, [qa(0)], template=str(template), tokenizer=hf)
    plain = tmp_path / "plain.json"
    train_bpe(["some text"] * 5, 270, str(plain))
    with pytest.raises(ConfigError, match=r"plain.json has no token '\[gMASK\]'"):
        bad_pipeline(tmp_path, [qa(0)], tokenizer={"kind": "hf", "path": str(plain), "eos_token": "<|endoftext|>"})


@pytest.mark.parametrize("change,message", [
    ({"sources": {"a": {"kind": "arrayrecord", "format": "chat", "paths": ["x"]}}},
     "sources.a.format: kind arrayrecord holds no conversations"),
    ({"sources": {"a": {"kind": "stdlib_chat", "template": "t.jinja"}}}, "sources.a.template: a chat template"),
    ({"sources": {"a": {"kind": "stdlib", "overlong": "drop"}}}, "sources.a.overlong: applies to format chat only"),
    ({"sources": {"a": {"kind": "stdlib_chat"}, "b": {"kind": "stdlib"}}, "mixture": {"a": 1, "b": 1}},
     "stages.0.mixture: mixes chat and text sources"),
])
def test_chat_config_errors(change, message):
    mixture = change.pop("mixture", {"a": 1})
    with pytest.raises(ConfigError, match=message):
        data_config.from_dict({**change, "stages": [{"name": "s", "seq_len": 64, "tokens_per_step": 64,
                                                      "tokens": 64, "mixture": mixture}]})
