"""examples/chat_finetune, as its README walks it: conversations and a base model made offline,
chat shards with loss masks, a fine-tune whose vocabulary grows, generate.py --chat, and the
export that transformers' own chat loop stops on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_fgc

EXAMPLE = REPO / "examples" / "chat_finetune"


def run(*args, cwd, stdin=None):
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, input=stdin,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_make_data_writes_conversations_and_a_base_model_without_a_chat_template(tmp_path):
    run(EXAMPLE / "make_data.py", tmp_path / "work", "--count", "50", cwd=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "work" / "conversations.jsonl").read_text().splitlines()]
    assert len(records) == 50
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)
    config = json.loads((tmp_path / "work" / "base" / "config.json").read_text())
    tok_config = json.loads((tmp_path / "work" / "base" / "tokenizer_config.json").read_text())
    assert config["model_type"] == "llama" and "chat_template" not in tok_config
    assert "<|im_end|>" not in (tmp_path / "work" / "base" / "tokenizer.json").read_text()
    # the same every time
    run(EXAMPLE / "make_data.py", tmp_path / "again", "--count", "50", "--no-base", cwd=tmp_path)
    assert (tmp_path / "again" / "conversations.jsonl").read_bytes() == (tmp_path / "work" / "conversations.jsonl").read_bytes()


@pytest.mark.slow
def test_the_readme_journey_teaches_the_base_model_to_chat(tmp_path):
    run(EXAMPLE / "make_data.py", "work/", cwd=tmp_path)
    run_fgc("data", "work/conversations.jsonl", "-o", "work/shards", "--tokenizer", "work/base", "--format", "chat",
            "--chat-template", "chatml", "--val-fraction", "0.1", cwd=tmp_path, check=True)
    meta = json.loads((tmp_path / "work" / "shards" / "meta.json").read_text())
    assert meta["loss_mask"] is True and meta["vocab_size"] == 514 and len(meta["eos_ids"]) == 2
    run_fgc("build", EXAMPLE / "finetune.yaml", "-o", "build/", "-D", "model_dir=work/base",
            "-D", "data_dir=work/shards", cwd=tmp_path, check=True)
    plan = json.loads((tmp_path / "build" / "manifest.json").read_text())["plan"]
    assert (plan["vocab_growth"]["from"], plan["vocab_growth"]["to"]) == (512, 514)

    proc = run("build/train.py", "--max-steps", "200", cwd=tmp_path)  # of 300: enough to learn them
    assert "the vocabulary grew from 512 to 514 tokens" in proc.stdout + proc.stderr
    evals = [json.loads(line)["eval_loss"] for line in (tmp_path / "output" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    assert len(evals) == 2 and evals[-1] < 0.5, evals  # it learned the conversations

    reply = run("build/generate.py", "--chat", "--temperature", "0", "What is your name?", cwd=tmp_path).stdout
    assert "Samantha" in reply and "<|im" not in reply, reply

    # transformers' chat loop on the export stops at the end of the assistant's turn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "output" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is your name?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert out[-1].item() == tok.convert_tokens_to_ids("<|im_end|>") and len(out) < 40
    assert "Samantha" in tok.decode(out)
