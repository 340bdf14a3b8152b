"""fastattn.nn against torch.nn: outputs, weights and gradients for every option of
MultiheadAttention and the transformer layers, state-dict compatibility, convert(), and
torch.compile. Errors are judged with the rule of docs/design.md: fastattn's float32 result may be at
most twice as far from torch's float64 result as torch's own float32 result is."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastattn.nn
import fastattn.nn.attention
from tolerance import assert_within_baseline

E, HEADS, BATCH, TGT, SRC = 32, 4, 3, 5, 7


def seeded(cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs)


def torch_twin(module):
    """A float64 copy of `module` with torch.nn classes, as the ground truth."""
    return copy.deepcopy(module).double()


def run(module, inputs, kwargs, grad):
    """Forward + backward of `module`; returns the outputs and the gradients of the float
    inputs and of every parameter (in named_parameters order)."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    module.zero_grad()
    outs = module(*inputs, **kwargs)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grad))
    loss.backward()
    grads = [t.grad for t in inputs if t.is_floating_point()]
    grads += [p.grad for _, p in module.named_parameters()]
    return outs, grads


def assert_matches_torch(ours, theirs, inputs, kwargs, mask_kwargs=()):
    """Checks `ours` (fastattn) against `theirs` (torch.nn, same weights) in float32,
    with torch's float64 run as the reference."""
    ref = torch_twin(theirs)
    kwargs64 = {k: (v.double() if k in mask_kwargs and v.is_floating_point() else v) for k, v in kwargs.items()}
    probe, _ = run(theirs, inputs, kwargs, [torch.zeros(())] * 2)
    grad = [torch.randn(o.shape) for o in probe]
    out, grads = run(ours, inputs, kwargs, grad)
    base_out, base_grads = run(theirs, inputs, kwargs, grad)
    ref_out, ref_grads = run(ref, [t.double() if t.is_floating_point() else t for t in inputs], kwargs64, grad)
    assert len(out) == len(ref_out)
    for i, (a, r, b) in enumerate(zip(out, ref_out, base_out)):
        assert_within_baseline(f"output {i}", a, r, b)
    assert len(grads) == len(ref_grads)
    for i, (a, r, b) in enumerate(zip(grads, ref_grads, base_grads)):
        assert (a is None) == (r is None), f"gradient {i} presence differs"
        if a is not None:
            assert_within_baseline(f"gradient {i}", a, r, b)


# ------------------------------------------------------------------------- MultiheadAttention

def make_masks(kind, batch, tgt, src, heads, dtype=torch.float32):
    """torch-convention masks (bool True = ignore) that leave every query a visible key."""
    g = torch.Generator().manual_seed(sum(kind.encode()))

    def ignore(*shape):
        m = torch.rand(*shape, generator=g) < 0.4
        m[..., 0] = False
        return m

    def additive(*shape):
        m = torch.randn(*shape, generator=g, dtype=dtype)
        return m.masked_fill(ignore(*shape), float("-inf"))

    masks = {
        "none": {},
        "kpm_bool": {"key_padding_mask": ignore(batch, src)},
        "kpm_float": {"key_padding_mask": additive(batch, src)},
        "attn_bool_2d": {"attn_mask": ignore(tgt, src)},
        "attn_float_3d": {"attn_mask": additive(batch * heads, tgt, src)},
        "bool_both": {"attn_mask": ignore(batch * heads, tgt, src), "key_padding_mask": ignore(batch, src)},
        "float_both": {"attn_mask": additive(tgt, src), "key_padding_mask": additive(batch, src)},
    }
    if kind.startswith("causal"):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt, dtype=dtype)
        masks[kind] = {"attn_mask": causal if kind == "causal_float" else torch.isinf(causal), "is_causal": True}
        if kind == "causal_kpm":
            masks[kind]["key_padding_mask"] = ignore(batch, src)
    return masks[kind]


MHA_OPTIONS = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 24, "vdim": 20},
}
MASKS = ["none", "kpm_bool", "kpm_float", "attn_bool_2d", "attn_float_3d", "bool_both", "float_both"]
CAUSAL_MASKS = ["causal_float", "causal_bool", "causal_kpm"]


def mha_inputs(options, mode, batch_first):
    """query, key, value for self-attention (one tensor), cross-attention with key is value,
    or distinct key/value (needed with kdim/vdim)."""
    src = TGT if mode == "self" else SRC

    def seq(length, dim):
        return torch.randn(BATCH, length, dim) if batch_first else torch.randn(length, BATCH, dim)

    x = seq(TGT, E)
    if mode == "self":
        return [x, x, x], src
    if "kdim" in options:
        return [x, seq(src, options["kdim"]), seq(src, options["vdim"])], src
    memory = seq(src, E)
    return [x, memory, memory], src


class SharedInputs(torch.nn.Module):
    """Calls `mha(x, x, x)` or `mha(x, m, m)` with the same tensor object, as models do, so the
    packed projection paths run."""

    def __init__(self, mha, mode):
        super().__init__()
        self.mha, self.mode = mha, mode

    def forward(self, query, key, value, **kwargs):
        if self.mode == "self":
            return self.mha(query, query, query, **kwargs)
        if self.mode == "shared_kv":
            return self.mha(query, key, key, **kwargs)
        return self.mha(query, key, value, **kwargs)


# kdim/vdim differ from embed_dim: cross-attention only
OPTION_MODES = [(o, m) for o in MHA_OPTIONS for m in ("self", "cross") if not (o == "kdim_vdim" and m == "self")]
# batch_first only transposes the inputs and the output, whatever the options, mask and
# need_weights: each of their combinations runs once, with batch_first chosen by parity so
# that every pair of them still runs with both batch_first values.
MHA_CASES = [
    pytest.param(option, mode, mask_kind, need_weights, batch_first,
                 id=f"{option}-{mode}-{mask_kind}-{need_weights}-{batch_first}")
    for i, (option, mode) in enumerate(OPTION_MODES)
    for j, mask_kind in enumerate(MASKS)
    for need_weights in (False, True)
    for batch_first in [(i + j + need_weights) % 2 == 0]
]


@pytest.mark.parametrize("option, mode, mask_kind, need_weights, batch_first", MHA_CASES)
def test_multihead_attention_matches_torch(option, mode, mask_kind, need_weights, batch_first):
    options = MHA_OPTIONS[option]
    theirs = seeded(torch.nn.MultiheadAttention, E, HEADS, batch_first=batch_first, **options)
    ours = seeded(fastattn.nn.MultiheadAttention, E, HEADS, batch_first=batch_first, **options)
    assert type(ours.state_dict()) is type(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    inputs, src = mha_inputs(options, mode, batch_first)
    kwargs = dict(make_masks(mask_kind, BATCH, TGT, src, HEADS), need_weights=need_weights)
    call_mode = "self" if mode == "self" else ("distinct" if "kdim" in options else "shared_kv")
    out = SharedInputs(ours, call_mode)(*inputs, **kwargs)[0]
    assert out.shape == inputs[0].shape and out.is_contiguous()  # as torch's, for .view() users
    assert_matches_torch(
        SharedInputs(ours, call_mode), SharedInputs(theirs, call_mode), inputs, kwargs,
        mask_kwargs=("attn_mask", "key_padding_mask"),
    )


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_kind", CAUSAL_MASKS)
@pytest.mark.parametrize("option", ["default", "bias_kv_zero_attn"])
def test_multihead_attention_causal_hint_matches_torch(option, mask_kind, need_weights):
    options = MHA_OPTIONS[option]
    theirs = seeded(torch.nn.MultiheadAttention, E, HEADS, batch_first=True, **options)
    ours = fastattn.nn.convert(copy.deepcopy(theirs))
    inputs, src = mha_inputs(options, "self", True)
    kwargs = dict(make_masks(mask_kind, BATCH, TGT, src, HEADS), need_weights=need_weights)
    assert_matches_torch(
        SharedInputs(ours, "self"), SharedInputs(theirs, "self"), inputs, kwargs,
        mask_kwargs=("attn_mask", "key_padding_mask"),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_low_precision(dtype, need_weights):
    theirs = seeded(torch.nn.MultiheadAttention, E, HEADS, batch_first=True).to(dtype)
    ours = fastattn.nn.convert(copy.deepcopy(theirs))
    inputs, src = mha_inputs({}, "cross", True)
    inputs = [t.to(dtype) for t in inputs]
    kwargs = dict(make_masks("float_both", BATCH, TGT, src, HEADS, dtype), need_weights=need_weights)
    assert_matches_torch(
        SharedInputs(ours, "shared_kv"), SharedInputs(theirs, "shared_kv"), inputs, kwargs,
        mask_kwargs=("attn_mask", "key_padding_mask"),
    )


@pytest.mark.parametrize("average_attn_weights", [True, False])
def test_multihead_attention_unbatched_and_per_head_weights(average_attn_weights):
    theirs = seeded(torch.nn.MultiheadAttention, E, HEADS, kdim=24, vdim=20)
    ours = fastattn.nn.convert(copy.deepcopy(theirs))
    query, key, value = torch.randn(TGT, E), torch.randn(SRC, 24), torch.randn(SRC, 20)
    masks = make_masks("bool_both", 1, TGT, SRC, HEADS)
    kwargs = {
        "key_padding_mask": masks["key_padding_mask"][0],
        "attn_mask": masks["attn_mask"],
        "average_attn_weights": average_attn_weights,
    }
    out, weights = ours(query, key, value, **kwargs)
    assert out.shape == (TGT, E)
    assert weights.shape == ((TGT, SRC) if average_attn_weights else (HEADS, TGT, SRC))
    assert_matches_torch(ours, theirs, [query, key, value], kwargs, mask_kwargs=("attn_mask",))


def test_multihead_attention_fully_masked_query_gives_zeros_not_nan():
    mha = seeded(fastattn.nn.MultiheadAttention, E, HEADS, batch_first=True, bias=False)
    x = torch.randn(2, TGT, E, requires_grad=True)
    attn_mask = torch.zeros(TGT, TGT, dtype=torch.bool)
    attn_mask[1] = True  # query 1 may see nothing
    for need_weights in (False, True):
        out, weights = mha(x, x, x, attn_mask=attn_mask, need_weights=need_weights)
        assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))  # no bias: zero in, zero out
        assert not out.isnan().any()
        if need_weights:
            assert torch.equal(weights[:, 1], torch.zeros_like(weights[:, 1]))
        out.sum().backward()
        assert not x.grad.isnan().any()


def test_multihead_attention_rejects_bad_arguments():
    mha = fastattn.nn.MultiheadAttention(E, HEADS, batch_first=True)
    x = torch.randn(2, TGT, E)
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(TGT, TGT + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, TGT + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, TGT, dtype=torch.int64))
    with pytest.raises(ValueError, match="embed_dim"):
        mha(torch.randn(2, TGT, E + 1), x, x)


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_dropout_in_training(need_weights):
    """Dropout applies in train() mode only, and is unbiased: averaged over many independent
    draws (one per batch row of identical inputs), the output tends to the eval output."""
    mha = seeded(fastattn.nn.MultiheadAttention, E, HEADS, dropout=0.3, batch_first=True)
    x = torch.randn(1, TGT, E).expand(2048, TGT, E)
    mha.eval()
    expected, _ = mha(x[:1], x[:1], x[:1], need_weights=need_weights)
    theirs = seeded(torch.nn.MultiheadAttention, E, HEADS, dropout=0.3, batch_first=True).eval()
    torch.testing.assert_close(expected, theirs(x[:1], x[:1], x[:1], need_weights=need_weights)[0])
    mha.train()
    out, _ = mha(x, x, x, need_weights=need_weights)
    assert not torch.allclose(out[0], out[1])  # independent dropout masks per row
    assert (out.mean(0) - expected[0]).abs().max() < 0.06
    out.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in mha.parameters())


# --------------------------------------------------------------------------- transformer layers

LAYER_OPTIONS = {
    "post_norm_relu": {},
    "pre_norm_gelu": {"norm_first": True, "activation": "gelu"},
    "callable_activation_no_bias": {"activation": F.silu, "bias": False},
}


def layer_masks(batch, tgt, src):
    g = torch.Generator().manual_seed(1)
    padding = torch.rand(batch, src, generator=g) < 0.3
    padding[:, 0] = False
    return padding, torch.nn.Transformer.generate_square_subsequent_mask(tgt)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("option", list(LAYER_OPTIONS))
def test_encoder_layer_matches_torch(option, batch_first):
    kwargs = dict(d_model=E, nhead=HEADS, dim_feedforward=48, dropout=0.0, batch_first=batch_first)
    theirs = seeded(torch.nn.TransformerEncoderLayer, **kwargs, **LAYER_OPTIONS[option])
    ours = seeded(fastattn.nn.TransformerEncoderLayer, **kwargs, **LAYER_OPTIONS[option])
    assert isinstance(ours.self_attn, fastattn.nn.MultiheadAttention)
    ours.load_state_dict(theirs.state_dict())
    padding, causal = layer_masks(BATCH, TGT, TGT)
    src = torch.randn(BATCH, TGT, E) if batch_first else torch.randn(TGT, BATCH, E)
    for masks in ({"src_key_padding_mask": padding}, {"src_mask": causal, "is_causal": True}):
        assert_matches_torch(ours, theirs, [src], masks, mask_kwargs=("src_mask",))


@pytest.mark.parametrize("option", list(LAYER_OPTIONS))
def test_decoder_layer_matches_torch(option):
    kwargs = dict(d_model=E, nhead=HEADS, dim_feedforward=48, dropout=0.0, batch_first=True)
    theirs = seeded(torch.nn.TransformerDecoderLayer, **kwargs, **LAYER_OPTIONS[option])
    ours = seeded(fastattn.nn.TransformerDecoderLayer, **kwargs, **LAYER_OPTIONS[option])
    assert isinstance(ours.multihead_attn, fastattn.nn.MultiheadAttention)
    ours.load_state_dict(theirs.state_dict())
    memory_padding, causal = layer_masks(BATCH, TGT, SRC)
    masks = {"tgt_mask": causal, "tgt_is_causal": True, "memory_key_padding_mask": memory_padding}
    inputs = [torch.randn(BATCH, TGT, E), torch.randn(BATCH, SRC, E)]
    assert_matches_torch(ours, theirs, inputs, masks, mask_kwargs=("tgt_mask",))


def small_transformer(cls, batch_first=True, norm_first=False):
    return seeded(
        cls, d_model=E, nhead=HEADS, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48,
        dropout=0.0, batch_first=batch_first, norm_first=norm_first,
    )


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
def test_transformer_matches_torch(batch_first, norm_first):
    theirs = small_transformer(torch.nn.Transformer, batch_first, norm_first)
    ours = small_transformer(fastattn.nn.Transformer, batch_first, norm_first)
    # Same seed, same construction order: identical initial weights, without loading.
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    attention = [m for m in ours.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(attention) == 6 and all(type(m) is fastattn.nn.MultiheadAttention for m in attention)
    src_padding, causal = layer_masks(BATCH, TGT, SRC)
    shape = (lambda n: (BATCH, n, E)) if batch_first else (lambda n: (n, BATCH, E))
    masks = {
        "tgt_mask": causal, "tgt_is_causal": True,
        "src_key_padding_mask": src_padding, "memory_key_padding_mask": src_padding,
    }
    inputs = [torch.randn(shape(SRC)), torch.randn(shape(TGT))]
    assert_matches_torch(ours, theirs, inputs, masks, mask_kwargs=("tgt_mask",))


def test_state_dicts_load_both_ways():
    for theirs, ours in (
        (seeded(torch.nn.MultiheadAttention, E, HEADS, kdim=24, vdim=20, add_bias_kv=True, seed=1),
         seeded(fastattn.nn.MultiheadAttention, E, HEADS, kdim=24, vdim=20, add_bias_kv=True, seed=2)),
        (small_transformer(torch.nn.Transformer), seeded(fastattn.nn.Transformer, E, HEADS, 2, 2, 48, 0.0, seed=3)),
    ):
        fresh_torch = copy.deepcopy(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
        for p in fresh_torch.parameters():
            torch.nn.init.normal_(p)
        fresh_torch.load_state_dict(ours.state_dict())
        for (name, a), b in zip(fresh_torch.state_dict().items(), ours.state_dict().values()):
            assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------ convert()

class Mixed(torch.nn.Module):
    """A model holding torch attention modules at several depths."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(E, HEADS, 48, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.pool = torch.nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.query = torch.nn.Parameter(torch.randn(1, 1, E))

    def forward(self, x, padding):
        h = self.encoder(x, src_key_padding_mask=padding)
        q = self.query.expand(x.shape[0], 1, E)
        return self.pool(q, h, h, key_padding_mask=padding, need_weights=False)[0]


def count_fastattn_calls(monkeypatch):
    calls = []
    attend = fastattn.nn.attention.attend

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return attend(*args, **kwargs)

    monkeypatch.setattr(fastattn.nn.attention, "attend", counting)
    return calls


def test_convert_swaps_modules_in_place_and_keeps_results(monkeypatch):
    model = seeded(Mixed).eval()
    x = torch.randn(BATCH, TGT, E)
    padding, _ = layer_masks(BATCH, TGT, TGT)
    padding[0] = False  # one full-length row
    with torch.no_grad():
        expected = model(x, padding)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert fastattn.nn.convert(model) is model
    assert type(model.encoder) is fastattn.nn.TransformerEncoder
    assert all(type(layer) is fastattn.nn.TransformerEncoderLayer for layer in model.encoder.layers)
    assert type(model.pool) is fastattn.nn.MultiheadAttention
    assert dict(model.named_parameters()) == params and list(model.state_dict()) == keys
    calls = count_fastattn_calls(monkeypatch)
    # eval + no_grad + batch_first + padding mask: where torch takes its nested-tensor and
    # native-kernel fast paths; the converted model must still call fastattn in every layer.
    with torch.no_grad():
        out = model(x, padding)
    assert len(calls) == 3
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert fastattn.nn.convert(model) is model  # converting twice changes nothing
    assert type(model.pool) is fastattn.nn.MultiheadAttention


def test_convert_keeps_torch_subclasses_but_converts_their_attention():
    class MyLayer(torch.nn.TransformerEncoderLayer):
        pass

    layer = fastattn.nn.convert(MyLayer(E, HEADS, 48, batch_first=True))
    assert type(layer) is MyLayer and type(layer.self_attn) is fastattn.nn.MultiheadAttention
    with pytest.raises(TypeError, match="model"):
        fastattn.nn.convert("not a module")


def test_fine_tuning_a_converted_encoder_lowers_the_loss():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, HEADS, 48, dropout=0.1, batch_first=True)
    model = fastattn.nn.convert(torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2), torch.nn.Linear(E, 2)))
    x, labels = torch.randn(16, TGT, E), torch.randint(0, 2, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x).mean(1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_compiled_converted_encoder_has_no_graph_break():
    torch._dynamo.reset()
    layer = torch.nn.TransformerEncoderLayer(E, HEADS, 48, dropout=0.0, batch_first=True, norm_first=True)
    model = fastattn.nn.convert(seeded(torch.nn.TransformerEncoder, layer, 2, enable_nested_tensor=False).eval())
    x = torch.randn(BATCH, TGT, E)
    padding, _ = layer_masks(BATCH, TGT, TGT)
    expected = model(x, src_key_padding_mask=padding)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, src_key_padding_mask=padding), expected, atol=1e-5, rtol=1e-5)
