"""An imported model keeps its tokenizer and its chat template: ids and spellings unchanged, every
verb that renders chat renders with the model's own template as `transformers` does, labels on the
assistant's tokens and its end-of-turn token, generation stopping at the model's end of turn, and
`kiln export` writing the template back unchanged.

The models are tiny random `LlamaForCausalLM`s saved by `transformers`, each with a byte-level BPE
trained here on a few lines and a chat template written here: a Qwen2.5-like ChatML one (no BOS,
the template inline in tokenizer_config.json, generation_config.json listing only <|endoftext|>
as a base model's does, so <|im_end|> must be found from the template) and a Llama-3-like one
(<|begin_of_text|> added by the tokenizer and the template, <|eot_id|>, chat_template.jinja).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import kiln
from kiln.data.chat import IGNORE, read_format
from kiln.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

LINES = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
         "What is 2 + 3? It is 5.", "Hello, how are you today? I am fine, thank you.",
         "Square of 3 is 9 and of 4 is 16.", "Describe the red cat. The cat is red."] * 20

CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
LLAMA3 = (
    "{{- bos_token }}\n{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}\n")
# ChatML with the assistant's reply marked for `return_assistant_tokens_mask`: with its <|im_end|>, and without
MARKED = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
MARKED_CONTENT_ONLY = MARKED.replace("{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}",
                                     "{% generation %}{{- message.content }}{% endgeneration %}{{- '<|im_end|>' }}")

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Square of 3?"},
        {"role": "assistant", "content": "9"}, {"role": "user", "content": "And 4?"},
        {"role": "assistant", "content": "16"}]
PROMPTS = [CONV[1:2], CONV[:2], CONV[:4], [{"role": "user", "content": "  What is 2 + 3?  "}]]


def _qwen_split():
    from tokenizers import Regex

    return Regex(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def hf_chat_model(where: Path, kind: str):
    """A tiny random model saved by `transformers` with its own tokenizer and chat template: a
    Qwen2.5-style one (Qwen2 architecture, ChatML) or a Llama-3.1-style one (llama3 RoPE scaling)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"]}[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "chatml":  # Qwen2's split (digits one by one), which transformers' Qwen2Tokenizer also applies
        split = pre_tokenizers.Split(_qwen_split(), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                       use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        fast.chat_template, ids = LLAMA3, {"bos_token_id": 0, "eos_token_id": [1, 4]}
    else:  # a Qwen2.5 base model's: no BOS, <|endoftext|> ends documents and pads
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        fast.chat_template, ids = CHATML, {"bos_token_id": 0, "eos_token_id": 0}
    fast.save_pretrained(where)
    if kind == "chatml":  # the template inline in tokenizer_config.json, as older saves have it
        tcfg = json.loads((where / "tokenizer_config.json").read_text())
        tcfg["chat_template"] = (where / "chat_template.jinja").read_text()
        (where / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
        (where / "chat_template.jinja").unlink()
    torch.manual_seed(0)
    shape = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=False, initializer_range=0.1, **ids)
    if kind == "llama3":  # Llama 3.1+'s RoPE scaling, from an 8x shorter original context
        model = LlamaForCausalLM(LlamaConfig(**shape, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}))
    else:  # Qwen2.5's architecture: biases on q, k and v
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    model.eval().save_pretrained(where)
    return where


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: (Hugging Face directory, imported run, transformers' tokenizer)}."""
    from transformers import AutoTokenizer

    from kiln.post.export import import_hf

    root = tmp_path_factory.mktemp("hf_chat")
    out = {}
    for kind in ("chatml", "llama3"):
        src = hf_chat_model(root / kind, kind)
        run, _ = import_hf(src, root / f"{kind}_run")
        out[kind] = (src, run, AutoTokenizer.from_pretrained(src, local_files_only=True))
    return out


def hf_ids(hftok, messages, **kw) -> list[int]:
    return hftok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]


def learned(fmt, r) -> str:
    return fmt.tokenizer.decode([t for t, lab in zip(r.ids, r.labels) if lab != IGNORE], skip_special_tokens=False)


# ---- import ---------------------------------------------------------------------------------------
def test_import_keeps_the_tokenizer_and_says_what_it_read(tmp_path, capsys):
    src = hf_chat_model(tmp_path / "chatml", "chatml")
    capsys.readouterr()
    assert kiln("import", str(src), f"out={tmp_path / 'run'}") == 0
    said = capsys.readouterr().out
    assert f"chat template from {src / 'tokenizer_config.json'}" in said and "BOS none" in said
    assert "EOS <|endoftext|> (0)" in said and "end of turn <|im_end|> (2)" in said
    tdir = tmp_path / "run" / "tokenizer"
    assert (tdir / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()  # no renamed, no added token
    tok = load_tokenizer(tdir)
    assert tok.get_vocab(with_added_tokens=True) == load_tokenizer_raw(src).get_vocab(with_added_tokens=True)
    assert tok.token_to_id("<|bos|>") is None and tok.token_to_id("<|assistant|>") is None
    record = json.loads((tdir / "chat.json").read_text())
    assert record["bos"] is None and record["eos"] == [0] and record["end"] == [2, 0] and record["pad"] == 0
    assert (tdir / "chat_template.jinja").read_text() == CHATML
    info = json.loads((tmp_path / "run" / "checkpoints" / "step_0000000" / "checkpoint.json").read_text())
    assert info["model"]["vocab_size"] == 320  # 300 ids, padded rows only


def load_tokenizer_raw(src: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(src / "tokenizer.json"))


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_serving_ids_are_apply_chat_templates(models, kind):
    from kiln.infer.generate import Engine
    from kiln.workloads.rl import render_prompts

    src, run, hftok = models[kind]
    engine = Engine.from_run(run, "cpu")
    fmt = engine.chat_format
    for messages in PROMPTS:
        assert fmt.prompt_ids(messages) == hf_ids(hftok, messages, add_generation_prompt=True), messages
        assert fmt.render_text(messages, True) == hftok.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)
    for text in ("What is 2 + 3?", "def add(a, b):"):
        assert engine.encode_prompt(text) == hftok(text).input_ids  # plain text: BOS only where the model adds it
    assert fmt.stop_ids >= {hftok.convert_tokens_to_ids(t) for t in
                            {"chatml": ["<|im_end|>", "<|endoftext|>"], "llama3": ["<|eot_id|>", "<|end_of_text|>"]}[kind]}
    rows = [{"prompt": m} for m in PROMPTS[1:3]]  # GRPO's chat prompts
    assert [p.ids for p in render_prompts(fmt, rows, "chat", 200, Counter())] == [
        hf_ids(hftok, r["prompt"], add_generation_prompt=True) for r in rows]


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_labels_sit_on_the_assistant_tokens_and_their_end_of_turn(models, kind):
    src, run, hftok = models[kind]
    fmt = read_format(run / "tokenizer" / "tokenizer.json")
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[kind]
    r = fmt.render(CONV)
    assert r.ids == hf_ids(hftok, CONV)  # training ids: the template's rendering, no special token added
    assert learned(fmt, r) == f"9{end}16{end}"
    labelled = [i for i, lab in enumerate(r.labels) if lab != IGNORE]
    assert all(r.labels[i] == r.ids[i] for i in labelled)
    # the labelled tokens are exactly each reply's tokens and the end-of-turn token after them
    for reply in ("9", "16"):
        before = hf_ids(hftok, CONV[: CONV.index(next(m for m in CONV if m["content"] == reply))],
                        add_generation_prompt=True)
        n = len(hftok(reply, add_special_tokens=False).input_ids) + 1
        assert r.ids[: len(before)] == before and all(r.labels[len(before) + k] != IGNORE for k in range(n))
        assert r.labels[len(before) - 1] == IGNORE
    assert len(labelled) == sum(len(hftok(x, add_special_tokens=False).input_ids) + 1 for x in ("9", "16"))
    assert learned(fmt, fmt.render(CONV, train_on="last")) == f"16{end}"


def test_generation_markers_give_the_labels_transformers_masks(models):
    from dataclasses import replace

    src, run, hftok = models["chatml"]
    fmt = read_format(run / "tokenizer")
    for template in (MARKED, MARKED_CONTENT_ONLY):
        marked = replace(fmt, template=template)
        r = marked.render(CONV)
        out = hftok.apply_chat_template(CONV, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
        assert r.ids == out["input_ids"]
        mask = [int(lab != IGNORE) for lab in r.labels]
        if template == MARKED:
            assert mask == out["assistant_masks"]
        else:  # the block holds the content only: kiln adds the end-of-turn token that follows it
            assert [m for m, t in zip(mask, r.ids) if t != 2] == [m for m, t in zip(out["assistant_masks"], r.ids)
                                                                  if t != 2]
        assert learned(marked, r) == "9<|im_end|>16<|im_end|>"


# ---- the verbs on an imported model -----------------------------------------------------------------
def describe_item(i: int) -> list[dict]:
    colors, animals = ["red", "blue", "green", "black"], ["cat", "dog", "bird", "fish"]
    return [{"role": "user", "content": f"Describe item {i}: a {colors[i % 4]} {animals[i // 4 % 4]}."},
            {"role": "assistant", "content": f"The {animals[i // 4 % 4]} is {colors[i % 4]}."}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TRAIN = ["train.seq_len=96", "train.batch_size=4", "train.warmup_steps=0", "train.log_every=1",
         "train.eval_batches=2", "train.tensorboard=false", "train.progress=false", "sft.eval_prompts=4",
         "sft.eval_max_new_tokens=12"]


# each kind: its template and its end-of-turn token
KINDS = {"chatml": (CHATML, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>")}


@pytest.fixture(scope="module", params=list(KINDS))
def sft_run(models, tmp_path_factory, request):
    """A short full SFT of the imported Qwen2.5-style and Llama-3.1-style models on their own templates."""
    src, run, hftok = models[request.param]
    d = tmp_path_factory.mktemp(f"sft_{request.param}")
    convs = [describe_item(i) for i in range(48)]
    data = write_jsonl(d / "train.jsonl", [{"messages": c} for c in convs[:40]])
    val = write_jsonl(d / "val.jsonl", [{"messages": c} for c in convs[40:]])
    out = d / "full"
    assert kiln("sft", f"out={out}", f"init_from={run}", f"sft.data={data}", f"sft.val_data={val}", *TRAIN,
                "train.max_steps=8", "train.eval_every=8", "train.lr=3e-3") == 0
    return out, data, val, request.param


def test_sft_full_and_lora_train_on_the_models_own_template(models, sft_run, tmp_path):
    from kiln.data.chat_data import ChatStats, tokenize

    out, data, val, kind = sft_run
    src, run, hftok = models[kind]
    template, end = KINDS[kind]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["val_loss"] for m in lines if "val_loss" in m]
    assert losses[-1] < losses[0]  # a short SFT lowers the held-out loss on the model's own format
    fmt = read_format(out / "tokenizer" / "tokenizer.json")
    assert not fmt.own and fmt.template == template and fmt.end[0] == hftok.convert_tokens_to_ids(end)  # kept
    (example,) = tokenize(fmt, [describe_item(0)], 96, ChatStats())
    assert list(example.ids) == hf_ids(hftok, describe_item(0))
    assert kiln("sft", f"out={tmp_path / 'lora'}", f"init_from={run}", f"sft.data={data}", f"sft.val_data={val}",
                *TRAIN, "train.max_steps=3", "train.eval_every=3", "lora.rank=4") == 0
    assert read_format(tmp_path / "lora" / "tokenizer").template == template


def test_dpo_runs_on_the_models_own_template(models, sft_run, tmp_path):
    out, _, _, kind = sft_run
    rows = [{"prompt": f"Please sort the list ({i}).", "chosen": "Sure, here it is.", "rejected": "No."}
            for i in range(24)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert kiln("dpo", f"out={tmp_path / 'dpo'}", f"init_from={out}", f"preference.data={pairs}",
                "preference.val_fraction=0.25", "train.seq_len=128", "train.batch_size=4", "train.max_steps=3",
                "train.eval_every=3", "train.eval_batches=2", "train.tensorboard=false", "train.progress=false") == 0
    assert read_format(tmp_path / "dpo" / "tokenizer").template == KINDS[kind][0]


def always_ends_the_turn(model, end: int) -> None:
    """Make a model's greedy choice `end` after any token: the residual stream is the token's
    embedding (attention and MLP outputs zeroed), whose first coordinate is 1, and only `end`'s head
    row reads it."""
    with torch.no_grad():
        for block in model.layers.values():
            block.attn.wo.weight.zero_()
            block.mlp.w2.weight.zero_()
        model.tok_emb.weight[:, 0] = 1.0
        model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[end, 0] = 10.0


@pytest.mark.parametrize("kind", list(KINDS))
def test_serve_chat_renders_the_template_and_stops_at_the_end_of_turn(models, kind):
    """The chat endpoint renders each model's own template and the reply ends at its end-of-turn
    token (for the ChatML model, whose generation_config.json names only <|endoftext|> as a base
    model's does, at the template's <|im_end|>)."""
    import httpx

    from kiln.config import ServeConfig
    from kiln.infer.generate import Engine, generate, greedy
    from kiln.serve.api import Server

    src, run, hftok = models[kind]
    engine = Engine.from_run(run, "cpu")
    im_end = hftok.convert_tokens_to_ids(KINDS[kind][1])
    always_ends_the_turn(engine.model, im_end)
    prompt = hf_ids(hftok, CONV[:2], add_generation_prompt=True)
    (seq,) = generate(engine.model, [prompt], greedy(8), stop_ids=engine.stop_ids)
    assert seq.tokens == [] and seq.stop_token == im_end and seq.ended_by == "end"
    sv = ServeConfig(port=0, max_batch=2, max_queue=8, max_new_tokens=16, max_total_tokens=200, max_n=2,
                     read_timeout_s=5.0)
    with Server(engine, sv, "tiny") as srv, httpx.Client(timeout=30) as http:
        r = http.post(srv.url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": CONV[:2], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(prompt)
        assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["message"]["content"] == ""


def test_export_writes_the_models_template_back_unchanged(models, sft_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.post.export import export_hf

    for src, run in ((models[sft_run[3]][0], sft_run[0]), (models["llama3"][0], models["llama3"][1])):
        out = export_hf(run, tmp_path / run.name)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            assert (out / name).is_file() == (src / name).is_file(), name
            if (src / name).is_file():
                assert (out / name).read_bytes() == (src / name).read_bytes(), name
        back = AutoTokenizer.from_pretrained(out, local_files_only=True)
        hftok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        assert hf_ids(back, CONV[:2], add_generation_prompt=True) == hf_ids(hftok, CONV[:2], add_generation_prompt=True)
        model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
        assert model.config.vocab_size == 300
    # the imported (untrained) one gives the original model's logits
    original = AutoModelForCausalLM.from_pretrained(models["llama3"][0], local_files_only=True, dtype=torch.float32)
    ids = torch.tensor([hf_ids(models["llama3"][2], CONV)])
    with torch.no_grad():
        assert (model(ids).logits - original(ids).logits).abs().max() < 1e-4


def test_the_harness_and_generate_use_the_models_template(models, capsys):
    src, run, hftok = models["llama3"]
    from kiln.infer.load import load

    lm = load(run, "cpu")
    harness = pytest.importorskip("kiln.eval.harness")
    klm = harness.KilnLM(loaded=lm)
    assert klm.chat_template() == LLAMA3
    assert klm.apply_chat_template(CONV[:2]) == hftok.apply_chat_template(CONV[:2], tokenize=False,
                                                                         add_generation_prompt=True)
    assert kiln("generate", f"out={run}", "prompt=Square of 3?", "sample.chat=on", "max_new_tokens=3",
                "temperature=0") == 0


def test_a_model_without_a_template_is_refused_in_chat_in_one_line(models, tmp_path, capsys):
    src = models["llama3"][0]
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    (bare / "chat_template.jinja").unlink()
    assert kiln("import", str(bare), f"out={tmp_path / 'run'}") == 0
    assert "no chat template" in capsys.readouterr().out
    assert kiln("generate", f"out={tmp_path / 'run'}", "prompt=hi", "sample.chat=on", "max_new_tokens=2") == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and len(err.strip().splitlines()) == 1
    assert kiln("generate", f"out={tmp_path / 'run'}", "prompt=hi", "max_new_tokens=2", "temperature=0") == 0
