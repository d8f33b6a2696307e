"""Data pipeline: formats, chat template, exact token layout, drop policy, errors, collator.

Expected ids are computed independently: the chat text is written out by hand here and
tokenized in one piece, never through qorpo's rendering code.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from qorpo.config import TrainConfig
from qorpo.data.collate import CHOSEN, PAD, REJECTED, PairCollator
from qorpo.data.encode import DEFAULT_CHAT_TEMPLATE, setup_chat_template
from qorpo.data.formats import (
    DROP_EMPTY,
    DROP_IDENTICAL,
    DROP_IDENTICAL_TRUNCATED,
    DROP_MALFORMED,
    DROP_MISSING,
    DROP_NOT_STRING,
    DROP_PROMPT_TOO_LONG,
    DROP_PROMPTS_DIFFER,
    DROP_TEMPLATE,
    DropRow,
    Pair,
    detect_format,
    to_messages,
)
from qorpo.data.prepare import prepare_data
from qorpo.data.report import DataReport, LengthStats
from qorpo.data.sources import load_rows
from qorpo.errors import DataError
from tests.tiny import make_tokenizer

END = "<|im_end|>"


# ----------------------------------------------------------------------------- helpers
def chatml(msgs: list[tuple[str, str]], gen: bool = False, *, bos: str = "",
           end: str = END) -> str:
    """The ChatML text written out by hand (independent of any template engine)."""
    text = bos + "".join(f"<|im_start|>{role}\n{content}{end}\n" for role, content in msgs)
    return text + ("<|im_start|>assistant\n" if gen else "")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_for(data: str, **kw) -> TrainConfig:
    kw.setdefault("max_length", 256)
    kw.setdefault("max_prompt_length", 128)
    kw.setdefault("min_response_tokens", 2)
    return TrainConfig(data=data, **kw)


def expected(tok, prompt_text: str, response: str, end: str = END) -> tuple[list[int], int]:
    """Ids of prompt + response + end-of-turn tokenized in one piece, and the response start.
    Valid where no BPE merge crosses the boundary (asserted)."""
    p_ids = ids(tok, prompt_text)
    full = ids(tok, prompt_text + response + end)
    assert full[:len(p_ids)] == p_ids
    return full, len(p_ids)


def only(prepared) -> dict:
    assert len(prepared.train) == 1
    return prepared.train[0]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# ----------------------------------------------------------------------------- formats
SYS, Q, A1, A2 = "Be short.", "What is 2 + 2?", "2 + 2 = 4.", "The answer is no."
FORMAT_ROWS = {
    "ultrafeedback": {
        "prompt": Q,
        "chosen": [{"role": "system", "content": SYS}, {"role": "user", "content": Q},
                   {"role": "assistant", "content": A1}],
        "rejected": [{"role": "system", "content": SYS}, {"role": "user", "content": Q},
                     {"role": "assistant", "content": A2}],
    },
    "explicit": {"system": SYS, "prompt": Q, "chosen": A1, "rejected": A2},
    "orca": {"system": SYS, "question": Q, "chosen": A1, "rejected": A2},
    "hh-rlhf": None,  # no system turn in hh transcripts: tested separately
    "sharegpt": {
        "conversations": [{"from": "system", "value": SYS}, {"from": "human", "value": Q}],
        "chosen": {"from": "gpt", "value": A1}, "rejected": {"from": "gpt", "value": A2},
    },
}


@pytest.mark.parametrize("fmt", [f for f, row in FORMAT_ROWS.items() if row])
def test_format_detected_and_tokenized_exactly(tok, tmp_path, fmt):
    row = FORMAT_ROWS[fmt]
    assert detect_format(list(row), row, {}) == fmt
    assert to_messages(row, fmt, {}) == Pair(
        [{"role": "system", "content": SYS}, {"role": "user", "content": Q}], A1, A2)
    out = prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row])), tok)
    assert out.format == fmt and out.train_report.format == fmt
    ex = only(out)
    prompt = chatml([("system", SYS), ("user", Q)], gen=True)
    for side, answer in (("chosen", A1), ("rejected", A2)):
        want, start = expected(tok, prompt, answer)
        assert ex[f"{side}_input_ids"] == want
        assert ex[f"{side}_response_start"] == start
    assert ex["row"] == 0
    assert ex["length"] == max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"]))


def test_explicit_message_lists_trl_style(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": Q}],
           "chosen": [{"role": "assistant", "content": A1}],
           "rejected": [{"role": "assistant", "content": A2}]}
    assert detect_format(list(row), row, {}) == "explicit"
    ex = only(prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row])), tok))
    want, start = expected(tok, chatml([("user", Q)], gen=True), A1)
    assert (ex["chosen_input_ids"], ex["chosen_response_start"]) == (want, start)


def test_hh_rlhf_multi_turn(tok, tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello there!\n\nHuman: What is 2 + 2?"
    row = {"chosen": shared + "\n\nAssistant: 2 + 2 = 4.",
           "rejected": shared + "\n\nAssistant: No."}
    assert detect_format(list(row), row, {}) == "hh-rlhf"
    out = prepare_data(cfg_for(write_jsonl(tmp_path / "hh.jsonl", [row])), tok)
    ex = only(out)
    prompt = chatml([("user", "Hi"), ("assistant", "Hello there!"), ("user", Q)], gen=True)
    want, start = expected(tok, prompt, "No.")
    assert (ex["rejected_input_ids"], ex["rejected_response_start"]) == (want, start)


def test_multi_turn_sharegpt_keeps_all_turns(tok, tmp_path):
    conv = [{"from": "system", "value": SYS}, {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello there!"}, {"from": "human", "value": Q}]
    row = {"conversations": conv, "chosen": {"from": "gpt", "value": A1},
           "rejected": {"from": "gpt", "value": A2}}
    ex = only(prepare_data(cfg_for(write_jsonl(tmp_path / "s.jsonl", [row])), tok))
    prompt = chatml([("system", SYS), ("user", "Hi"), ("assistant", "Hello there!"),
                     ("user", Q)], gen=True)
    want, start = expected(tok, prompt, A1)
    assert (ex["chosen_input_ids"], ex["chosen_response_start"]) == (want, start)


def test_empty_system_is_no_system_turn(tok, tmp_path):
    row = {"system": "", "question": Q, "chosen": A1, "rejected": A2}
    ex = only(prepare_data(cfg_for(write_jsonl(tmp_path / "o.jsonl", [row])), tok))
    want, start = expected(tok, chatml([("user", Q)], gen=True), A1)
    assert (ex["chosen_input_ids"], ex["chosen_response_start"]) == (want, start)


def test_column_mapping(tok, tmp_path):
    row = {"q": Q, "good": A1, "bad": A2, "sys": SYS, "other": 1}
    mapping = {"prompt": "q", "chosen": "good", "rejected": "bad", "system": "sys"}
    assert detect_format(list(row), row, mapping) == "columns"
    out = prepare_data(cfg_for(write_jsonl(tmp_path / "c.jsonl", [row]), columns=mapping), tok)
    assert out.format == "columns"
    want, start = expected(tok, chatml([("system", SYS), ("user", Q)], gen=True), A2)
    ex = only(out)
    assert (ex["rejected_input_ids"], ex["rejected_response_start"]) == (want, start)


def test_unknown_format_names_columns_and_mapping_option():
    with pytest.raises(DataError) as err:
        detect_format(["instruction", "good", "bad"], {"good": "x"}, {})
    assert "instruction" in str(err.value) and "--columns" in str(err.value)
    with pytest.raises(DataError) as err:
        detect_format(["q", "good", "bad"], {}, {"prompt": "question", "chosen": "good",
                                                 "rejected": "bad"})
    assert "prompt=question" in str(err.value) and "'q'" in str(err.value)


# ----------------------------------------------------------------------------- templates
def test_base_model_default_template_one_bos(tmp_path):
    tok = make_tokenizer(chat_template=None, add_bos=True)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds a BOS itself
    row = {"prompt": Q, "chosen": A1, "rejected": A2}
    out = prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row])), tok)
    assert out.chat_template == DEFAULT_CHAT_TEMPLATE == tok.chat_template
    ex = only(out)
    prompt = chatml([("user", Q)], gen=True, bos="<s>", end="</s>")
    want, start = expected(tok, prompt, A1, end="</s>")
    assert ex["chosen_input_ids"] == want and ex["chosen_response_start"] == start
    assert ex["chosen_input_ids"].count(tok.bos_token_id) == 1
    assert ex["chosen_input_ids"][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")


def test_default_template_bos_rules():
    tok = make_tokenizer(chat_template=None)
    msgs = [{"role": "user", "content": "hi"}]
    render = tok.apply_chat_template
    kw = {"tokenize": False, "chat_template": DEFAULT_CHAT_TEMPLATE}
    assert render(msgs, **kw).startswith("<s><|im_start|>")  # bos distinct from eos
    assert render(msgs, add_bos_token=False, **kw).startswith("<|im_start|>")  # override
    tok.bos_token = tok.eos_token  # GPT-2 style: bos == eos means no BOS is wanted
    assert render(msgs, **kw) == "<|im_start|>user\nhi</s>\n"


@pytest.mark.parametrize("template_bos", [True, False])
def test_exactly_one_bos_with_template_and_tokenizer_bos(tmp_path, template_bos):
    tok = make_tokenizer(chat_template=None, add_bos=True)
    template = ("{{ bos_token }}" if template_bos else "") + DEFAULT_CHAT_TEMPLATE.replace(
        "{%- if _bos -%}{{ bos_token }}{%- endif -%}", "")
    row = {"prompt": Q, "chosen": A1, "rejected": A2}
    out = prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row]),
                               chat_template=template), tok)
    seq = only(out)["chosen_input_ids"]
    assert seq[0] == tok.bos_token_id and seq.count(tok.bos_token_id) == 1


def test_setup_chat_template_precedence(tmp_path):
    tok = make_tokenizer()
    own = tok.chat_template
    assert setup_chat_template(tok, None) == own
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert setup_chat_template(tok, str(path)) == path.read_text() == tok.chat_template
    assert setup_chat_template(make_tokenizer(chat_template=None), None) == DEFAULT_CHAT_TEMPLATE
    with pytest.raises(DataError, match="not found"):
        setup_chat_template(tok, str(tmp_path / "missing.jinja"))
    with pytest.raises(DataError, match="does not render"):
        setup_chat_template(tok, "{% for m in messages %}{{ m.content | nosuchfilter }}")


def test_eos_trained_when_pad_is_eos(tmp_path):
    tok = make_tokenizer(pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    rows = [{"prompt": Q, "chosen": A1, "rejected": A2},
            {"prompt": "Hi", "chosen": "Hello there! How are you today?", "rejected": "No."}]
    out = prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows)), tok)
    feats = [out.train[i] for i in range(2)]
    batch = PairCollator(tok.pad_token_id).batch(feats)  # padded: rows = chosen, rejected
    spec = batch.spec
    for i, seq in enumerate([f["chosen_input_ids"] for f in feats]
                            + [f["rejected_input_ids"] for f in feats]):
        n = len(seq)
        assert seq[-1] == tok.eos_token_id
        assert batch.part[i, n - 1] in (CHOSEN, REJECTED)  # the EOS is a response token ...
        mine = spec.seq == i
        assert spec.target[mine][-1] == tok.eos_token_id  # ... and scored, from position n-2
        assert spec.index[mine][-1] == i * batch.input_ids.shape[1] + n - 2
        assert (batch.part[i, n:] == PAD).all()  # the padding (also EOS) is not
        assert batch.input_ids[i, n:].eq(tok.pad_token_id).all()
        assert not (spec.index[mine] % batch.input_ids.shape[1] >= n - 1).any()


def test_trailing_newline_after_end_of_turn_not_scored(tok, tmp_path):
    row = {"prompt": Q, "chosen": A1, "rejected": A2}
    ex = only(prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row])), tok))
    rendered = tok.apply_chat_template([{"role": "user", "content": Q},
                                        {"role": "assistant", "content": A1}], tokenize=False)
    assert rendered.endswith(END + "\n")  # the template writes "\n" after <|im_end|>
    assert ex["chosen_input_ids"][-1] == tok.convert_tokens_to_ids(END)


def test_template_without_end_token_gets_one_eos(tok, tmp_path):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    row = {"prompt": Q, "chosen": A1, "rejected": A2}
    ex = only(prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row]),
                                   chat_template=template), tok))
    seq = ex["chosen_input_ids"]
    assert seq[-1] == tok.eos_token_id and seq.count(tok.eos_token_id) == 1
    assert tok.decode(seq[ex["chosen_response_start"]:]) == f" {A1}{END}"


def test_boundary_merge_handled(tok, tmp_path):
    # The generation prompt ends with a space; BPE joins it with the response's first word.
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
                "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}Assistant: {% endif %}")
    prompt, answer = "User: Hi\nAssistant: ", "the answer"
    p_ids = ids(tok, prompt)
    joined = ids(tok, prompt + answer)
    assert joined[:len(p_ids)] != p_ids  # the merge really happens ("Ġ" + "the" -> "Ġthe")
    row = {"prompt": "Hi", "chosen": answer, "rejected": "no"}
    ex = only(prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", [row]),
                                   chat_template=template), tok))
    seq, start = ex["chosen_input_ids"], ex["chosen_response_start"]
    assert seq[:start] == p_ids  # the prompt exactly as inference tokenizes it
    assert seq[start:] == ids(tok, answer + END)
    assert tok.decode(seq) == prompt + answer + END


# ----------------------------------------------------------------------------- drops
def test_every_drop_reason_counted(tok, tmp_path):
    good = {"prompt": Q, "chosen": A1, "rejected": A2}
    long_prompt = " ".join(["the quick brown fox"] * 20)
    rows = [
        good,                                                    # 0 kept
        {"prompt": None, "chosen": A1, "rejected": A2},          # 1 missing
        {"prompt": "  ", "chosen": A1, "rejected": A2},          # 2 empty
        {"prompt": Q, "chosen": "", "rejected": A2},             # 3 empty
        {"prompt": Q, "chosen": A1, "rejected": A1},             # 4 identical
        {"prompt": long_prompt, "chosen": A1, "rejected": A2},   # 5 prompt too long
        {"prompt": "boom", "chosen": A1, "rejected": A2},        # 6 template error
        {"prompt": Q, "chosen": "the quick brown fox " * 9 + "a",
         "rejected": "the quick brown fox " * 9 + "b"},          # 7 identical after cut
    ]
    template = ("{% for m in messages %}{% if m['content'] == 'boom' %}"
                "{{ raise_exception('boom') }}{% endif %}{% endfor %}"
                + make_tokenizer().chat_template)
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), max_length=40, max_prompt_length=35,
                  min_response_tokens=8, chat_template=template)
    out = prepare_data(cfg, tok)
    rep = out.train_report
    assert {k: v.first_rows for k, v in rep.dropped.items()} == {
        DROP_MISSING: [1], DROP_EMPTY: [2, 3], DROP_IDENTICAL: [4], DROP_PROMPT_TOO_LONG: [5],
        DROP_TEMPLATE: [6], DROP_IDENTICAL_TRUNCATED: [7]}
    assert rep.dropped[DROP_EMPTY].count == 2
    assert rep.rows_read == 8 and rep.rows_kept == 1 and out.train["row"] == [0]
    assert rep.rows_kept + sum(d.count for d in rep.dropped.values()) == rep.rows_read


def test_structure_drop_reasons():
    def reason(row, fmt):
        with pytest.raises(DropRow) as err:
            to_messages(row, fmt, {})
        return err.value.reason

    u = {"role": "user", "content": Q}
    assert reason({"prompt": Q, "chosen": 3, "rejected": A2}, "explicit") == DROP_NOT_STRING
    assert reason({"chosen": [u, {"role": "assistant", "content": A1}],
                   "rejected": [{"role": "user", "content": "other"},
                                {"role": "assistant", "content": A2}]},
                  "ultrafeedback") == DROP_PROMPTS_DIFFER
    assert reason({"chosen": [u], "rejected": [u]}, "ultrafeedback") == DROP_MALFORMED
    assert reason({"chosen": [{"role": "wizard", "content": Q}], "rejected": []},
                  "ultrafeedback") == DROP_MALFORMED
    assert reason({"chosen": "just text", "rejected": "\n\nHuman: a\n\nAssistant: b"},
                  "hh-rlhf") == DROP_MALFORMED
    assert reason({"chosen": "\n\nHuman: a\n\nAssistant: b",
                   "rejected": "\n\nHuman: c\n\nAssistant: d"}, "hh-rlhf") == DROP_PROMPTS_DIFFER
    assert reason({"chosen": "\n\nHuman: a\n\nAssistant: b",
                   "rejected": "\n\nHuman: a\n\nAssistant:"}, "hh-rlhf") == DROP_EMPTY
    assert reason({"conversations": [], "chosen": {"from": "gpt", "value": A1},
                   "rejected": {"from": "gpt", "value": A2}}, "sharegpt") == DROP_EMPTY
    assert reason({"conversations": [{"from": "human", "value": Q}],
                   "chosen": {"from": "human", "value": A1},
                   "rejected": {"from": "gpt", "value": A2}}, "sharegpt") == DROP_MALFORMED


def test_all_dropped_raises_with_reasons_and_advice(tok, tmp_path):
    long_prompt = " ".join(["the quick brown fox"] * 20)
    rows = [{"prompt": long_prompt, "chosen": A1, "rejected": A2}] * 3
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), max_length=40, max_prompt_length=38,
                  min_response_tokens=8)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tok)
    msg = str(err.value)
    assert DROP_PROMPT_TOO_LONG in msg and "--max-length" in msg and "3 rows" in msg


def test_truncation_policy(tmp_path):
    tok = make_tokenizer(add_bos=True)  # ChatML template (no BOS) + tokenizer BOS
    long_prompt = " ".join(["the quick brown fox"] * 10)
    long_answer = "Paris is the capital of France. " * 6
    rows = [{"prompt": long_prompt, "chosen": long_answer, "rejected": "No."}]
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), max_length=48, max_prompt_length=20,
                  min_response_tokens=4)
    out = prepare_data(cfg, tok)
    ex = only(out)
    full_prompt = [tok.bos_token_id] + ids(tok, chatml([("user", long_prompt)], gen=True))
    start = ex["chosen_response_start"]
    assert start == 20
    # left truncation: BOS kept, then the END of the prompt
    assert ex["chosen_input_ids"][:start] == [tok.bos_token_id] + full_prompt[-19:]
    chosen = ex["chosen_input_ids"]
    assert len(chosen) == 48 and chosen[start:] == ids(tok, long_answer)[:28]
    assert tok.eos_token_id not in chosen[start:]  # a cut response must not teach a stop
    rejected = ex["rejected_input_ids"]
    assert rejected[start:] == ids(tok, "No." + END)  # short response: whole, with its EOS
    rep = out.train_report
    assert (rep.truncated_prompts, rep.truncated_responses) == (1, 1)
    assert rep.total_tokens.max == 48 and rep.response_tokens.max == 28
    assert rep.untruncated_tokens.max == len(full_prompt) + len(ids(tok, long_answer + END))


def test_no_zero_response_pairs_and_min_response_tokens(tok, tmp_path):
    rows = [{"prompt": "x " * n, "chosen": A1 * 3, "rejected": A2 * 3} for n in range(1, 40)]
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), max_length=40, max_prompt_length=39,
                  min_response_tokens=5)
    out = prepare_data(cfg, tok)
    for ex in out.train:
        for side in ("chosen", "rejected"):
            assert len(ex[f"{side}_input_ids"]) - ex[f"{side}_response_start"] >= 5
            assert len(ex[f"{side}_input_ids"]) <= 40
    rep = out.train_report
    assert rep.dropped[DROP_PROMPT_TOO_LONG].count > 0
    assert rep.rows_kept + sum(d.count for d in rep.dropped.values()) == rep.rows_read == 39


# ----------------------------------------------------------------------------- files
def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": oops}\n')
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert f"{path}:2" in str(err.value) and "line 2" in str(err.value)


def test_bad_json_array_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": }\n]\n')
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert f"{path}:3:" in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    odd = tmp_path / "data.txt"
    odd.write_text("hello")
    with pytest.raises(DataError, match=r"data.txt: unknown data file extension '\.txt'"):
        load_rows(str(odd))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(str(empty))
    mixed = tmp_path / "mixed.jsonl"
    write_jsonl(mixed, [{"chosen": "a"}, {"chosen": [{"role": "user", "content": "b"}]}])
    with pytest.raises(DataError, match="column 'chosen' is str in row 0 but list in row 1"):
        load_rows(str(mixed))
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="list.jsonl:2: expected a JSON object"):
        load_rows(str(notobj))


def test_missing_columns_error_from_prepare(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": Q, "output": A1}])
    with pytest.raises(DataError) as err:
        prepare_data(cfg_for(path), tok)
    assert "['instruction', 'output']" in str(err.value) and "--columns" in str(err.value)


def test_json_array_parquet_csv_load_the_same(tmp_path):
    rows = [{"prompt": Q, "chosen": A1, "rejected": A2}, {"prompt": "Hi", "chosen": "Hello",
                                                          "rejected": "No."}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with open(tmp_path / "a.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name in ("a.json", "a.parquet", "a.csv"):
        assert load_rows(str(tmp_path / name)).to_list() == rows, name


def test_hub_dataset_call(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, **kw):
        calls.append((path, name, kw))
        return datasets.Dataset.from_list([{"prompt": Q, "chosen": A1, "rejected": A2}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_rows("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", subset="x")
    assert len(rows) == 1
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", "x", {"split": "train_prefs"})]


def test_hub_dataset_error_is_clear(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load dataset 'org/name'.*--split"):
        load_rows("org/name", split="test")


# ----------------------------------------------------------------------------- eval split
def test_eval_fraction_deterministic(tok, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = prepare_data(cfg_for(path, eval_fraction=0.25, seed=1), tok)
    b = prepare_data(cfg_for(path, eval_fraction=0.25, seed=1), tok)
    c = prepare_data(cfg_for(path, eval_fraction=0.25, seed=2), tok)
    assert a.eval["row"] == b.eval["row"] and a.train["row"] == b.train["row"]
    assert a.eval["row"] != c.eval["row"]
    assert len(a.eval) == 10
    assert sorted(list(a.train["row"]) + list(a.eval["row"])) == list(range(40))
    assert a.eval_report.rows_read == 10 and a.train_report.rows_read == 30
    # --max-samples caps the training rows; the eval rows are held out of the same rows (the
    # first ceil(5 / 0.75) = 7), in the same proportion, not taken from the whole file
    capped = prepare_data(cfg_for(path, eval_fraction=0.25, seed=1, max_samples=5), tok)
    assert len(capped.train) == 5 and len(capped.eval) == 2
    rows = list(capped.train["row"]) + list(capped.eval["row"])
    assert sorted(rows) == list(range(7))


def test_eval_data_file_and_eval_split_on_file(tok, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": Q, "chosen": A1, "rejected": A2}])
    ev = write_jsonl(tmp_path / "e.jsonl", [{"system": "", "question": Q, "chosen": A1,
                                             "rejected": A2}])
    out = prepare_data(cfg_for(train, eval_data=ev), tok)
    assert out.format == "explicit" and out.eval_report.format == "orca" and len(out.eval) == 1
    assert prepare_data(cfg_for(train), tok).eval is None
    with pytest.raises(DataError, match="--eval-split applies to hub datasets"):
        prepare_data(cfg_for(train, eval_split="test"), tok)


# ----------------------------------------------------------------------------- collator
def test_collator_shapes_padding_masks():
    feats = [
        {"row": 7, "chosen_input_ids": [5, 6, 7, 8], "chosen_response_start": 2,
         "rejected_input_ids": [5, 6, 9], "rejected_response_start": 2, "length": 4},
        {"row": 3, "chosen_input_ids": list(range(10, 21)), "chosen_response_start": 2,
         "rejected_input_ids": [10, 11, 0], "rejected_response_start": 2, "length": 11},
    ]
    out = PairCollator(pad_token_id=0)(feats)
    assert out["row"].tolist() == [7, 3] and out["num_pairs"] == 2
    batch = PairCollator(pad_token_id=0).batch(feats)
    assert batch.input_ids.shape == (4, 16)  # 2B rows, T = 11 rounded up to 16
    assert batch.input_ids[0, :4].tolist() == [5, 6, 7, 8]  # chosen of pair 0
    assert batch.input_ids[2, :3].tolist() == [5, 6, 9]  # rejected of pair 0
    assert batch.input_ids[3, :3].tolist() == [10, 11, 0]  # rejected of pair 1
    assert batch.attention_mask().sum(1).tolist() == [4, 11, 3, 3]
    assert batch.attention_mask()[1, 11:].sum() == 0  # right padding
    want = torch.zeros(4, 16, dtype=torch.long)
    want[0, 2:4] = 1
    want[1, 2:11] = 1
    want[2, 2:3] = 1
    want[3, 2:3] = 1  # id 0 == pad id, still a response token: masks come from positions
    response = ((batch.part == CHOSEN) | (batch.part == REJECTED)).long()
    assert torch.equal(response, want)
    assert PairCollator(0).batch(feats[:1]).input_ids.shape == (2, 8)
    # one row per pair, the prompt once: 2 + 2 + 1 and 2 + 9 + 1 tokens
    shared = PairCollator(0, layout="shared").batch(feats)
    assert shared.input_ids.shape == (2, 16) and shared.unique_tokens == 5 + 12
    # packed: one row of 5 + 12 tokens costs less than two rows of 12 (7 of them padding)
    packed = PairCollator(0, layout="packed", pad_to_multiple_of=1).batch(feats)
    assert packed.input_ids.shape == (1, 17) and packed.pad_tokens == 0
    capped = PairCollator(0, layout="packed", pad_to_multiple_of=1, max_row_tokens=12)
    assert capped.batch(feats).input_ids.shape == (2, 12)  # 12 can't take 5 more
    with pytest.raises(ValueError, match="do not share the prompt"):
        PairCollator(0)([{**feats[0], "rejected_response_start": 1}])


# ----------------------------------------------------------------------------- report
def test_length_stats_and_report(tok, tmp_path):
    assert LengthStats.of([1, 2, 3, 4, 100]) == LengthStats(3, 62, 100)
    assert LengthStats.of([]) == LengthStats(0, 0, 0)
    rows = [{"prompt": "q" * n, "chosen": "yes " * n, "rejected": "no"} for n in range(1, 12)]
    console = Console(file=io.StringIO(), width=120)
    out = prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows)), tok, console=console)
    rep = out.train_report
    prompts = [ex["chosen_response_start"] for ex in out.train]
    totals = [len(ex[f"{s}_input_ids"]) for ex in out.train for s in ("chosen", "rejected")]
    assert rep.prompt_tokens == LengthStats.of(prompts)
    assert rep.total_tokens == LengthStats.of(totals) == rep.untruncated_tokens
    assert isinstance(rep, DataReport) and rep.format == "explicit"
    assert json.loads(json.dumps(rep.to_dict()))["rows_kept"] == 11
    log = console.file.getvalue()
    assert "format explicit (detected)" in log and "rows kept" in log and "p90" in log


def test_ten_thousand_rows_take_seconds(tok, tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{i} + {i} = {2 * i}.",
             "rejected": f"The answer is {i}."} for i in range(10_000)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    start = time.perf_counter()
    out = prepare_data(cfg_for(path), tok)
    assert len(out.train) == 10_000
    assert time.perf_counter() - start < 20


# ----------------------------------------------------------------------------- real data
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dpo_en_demo.json"
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_file(), reason="shared/data/dpo_en_demo.json not present")
@pytest.mark.parametrize("template", [None, SMOLLM2_TEMPLATE], ids=["chatml", "smollm2"])
def test_dpo_en_demo(tmp_path, template):
    tok = make_tokenizer()
    cfg = TrainConfig(data=str(SHARED), max_length=512, max_prompt_length=256,
                      chat_template=template)
    console = Console(file=io.StringIO(), width=140)
    out = prepare_data(cfg, tok, console=console)
    print(console.file.getvalue())
    rep = out.train_report
    assert out.format == "sharegpt" and rep.rows_read == 300
    assert rep.rows_kept + sum(d.count for d in rep.dropped.values()) == rep.rows_read
    assert rep.rows_kept == len(out.train) > 0
    eot = tok.convert_tokens_to_ids(END)
    for ex in out.train:
        for side in ("chosen", "rejected"):
            seq, start = ex[f"{side}_input_ids"], ex[f"{side}_response_start"]
            assert len(seq) - start >= 1 and len(seq) <= 512 and start <= 256
            assert eot not in seq[start:-1]  # one end-of-turn at most, and only at the end
