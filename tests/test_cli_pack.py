"""`snapkv pack` and `snapkv ask`: argument errors before any model loads, and the real model end to end."""

import pytest
import torch

import snapkv
from snapkv import cli
from snapkv.core import loading


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command loads a model: its arguments must be checked first."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", load_model)


@pytest.fixture
def document(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("The special magic number for Lisbon is 7141592.\n" * 20)
    return path


def test_pack_checks_its_arguments_before_loading_the_model(no_model, document, tmp_path, capsys):
    assert cli.main(["pack", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "p")]) == 1
    assert "no document at" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n")
    assert cli.main(["pack", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "p")]) == 1
    assert "is empty" in capsys.readouterr().err
    assert cli.main(["pack", str(document), "--out", str(tmp_path / "p"), "--budget", "16"]) == 1
    assert "--budget (16) must exceed --window-size (32)" in capsys.readouterr().err
    assert cli.main(["pack", str(document), "--out", str(tmp_path / "p"), "--budget", "64", "--policy", "nope"]) == 1
    assert "unknown --policy 'nope': choose from full, snapkv" in capsys.readouterr().err
    assert cli.main(["pack", str(document), "--out", str(tmp_path)]) == 1
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert cli.main(["pack", str(document), "--out", str(tmp_path / "p"), "--dtype", "int8"]) == 1
    assert "dtype 'int8'" in capsys.readouterr().err


def test_ask_checks_its_arguments_before_loading_the_model(no_model, tmp_path, capsys):
    assert cli.main(["ask", str(tmp_path / "absent"), "What?"]) == 1
    assert "no KV pack folder" in capsys.readouterr().err
    assert cli.main(["ask", str(tmp_path), "What?"]) == 1
    assert "not a complete KV pack" in capsys.readouterr().err
    assert cli.main(["ask", str(tmp_path), "What?", "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_pack_then_ask_answers_as_the_pack_does_in_python(smollm, document, tmp_path, capsys):
    from snapkv.analysis.quality.packs import document_ids, question_ids

    model, tokenizer = smollm
    out = tmp_path / "pack"
    assert cli.main(["pack", str(document), "--out", str(out), "--budget", "64"]) == 0
    assert f"{out}: " in capsys.readouterr().out
    questions = ["What is the special magic number for Lisbon?", "Which city is mentioned?"]
    assert cli.main(["ask", str(out), *questions, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    packed = snapkv.pack(model, document_ids(tokenizer, document.read_text()), snapkv.SnapKV(max_capacity_prompt=64))
    for question in questions:
        ids = question_ids(tokenizer, question)
        tokens = packed.generate(ids, max_new_tokens=8, do_sample=False)[0, packed.context_length + ids.shape[1]:]
        answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert f"Q: {question}\nA: {answer}\n" in printed
    assert torch.equal(snapkv.KVPack.load(out, model, tokenizer).context_ids, packed.context_ids)


@pytest.mark.slow
def test_pack_takes_any_registered_method_by_name(smollm, document, tmp_path, capsys):
    from snapkv.analysis.quality.packs import document_ids

    model, tokenizer = smollm
    out = tmp_path / "pack"
    assert cli.main(["pack", str(document), "--out", str(out), "--budget", "96", "--policy", "knorm+span",
                     "--window-size", "16"]) == 0
    loaded = snapkv.KVPack.load(out, model, tokenizer)
    expected = snapkv.method_policy("knorm+span", 96, window_size=16, tokenizer=tokenizer)
    assert loaded.policy == expected  # the wrapper and its KNorm, rebuilt from the pack's record
    packed = snapkv.pack(model, document_ids(tokenizer, document.read_text()), expected)
    assert torch.equal(loaded.cache.layers[0].keys, packed.cache.layers[0].keys)
