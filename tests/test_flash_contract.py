"""Flash attention's contract, checked on a CPU: every path a GPU runs (Paddle's kernels) goes through
`attention.check_flash_contract`, so a mask that would stop the GPU kernel fails here.

Paths: prefill, cached decode, speculative verify (several tokens per row against a cache),
continuous batching (rows joining a running batch) and training forward + backward, each with
equal-length batches (no row padded: the case that used to build a [1, 1, Q, K] mask for a batch
of 2) and with padded ones. Every call is recorded: the tests also prove the checked path ran."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddle_caption.model import attention as attention_module
from paddle_caption.model.attention import FlashContractError, check_flash_contract
from paddle_caption.model.numpy_bridge import paddle_kernels

from .conftest import random_image_prompts, small_config

B, H, D = 2, 3, 4


def tensors(q_len=5, k_len=7, b=B, dtype="float32"):
    rng = np.random.default_rng(0)
    return [paddle.to_tensor(rng.standard_normal((b, n, H, D)).astype(np.float32)).astype(dtype)
            for n in (q_len, k_len, k_len)]


# --------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("mask_shape", [[B, 1, 5, 7], [B, H, 5, 7], [B, 1, 1, 7], [B, H, 1, 7]])
def test_masks_flash_takes_pass(mask_shape):
    q, k, v = tensors()
    check_flash_contract(q, k, v, paddle.zeros(mask_shape), False)


@pytest.mark.parametrize("mask_shape, message", [
    ([1, 1, 5, 7], r"\[1, 1, 5, 7\] breaks flash attention's contract: expected \[2, 1 or 3, 1 or 5, 7\]"),
    ([1, 1, 1, 7], "breaks flash attention's contract"),  # the decode step's old mask
    ([B, 2, 5, 7], "breaks"), ([B, 1, 4, 7], "breaks"), ([B, 1, 5, 6], "breaks"), ([5, 7], "breaks"),
])
def test_masks_flash_refuses_fail_in_one_line(mask_shape, message):
    q, k, v = tensors()
    with pytest.raises(FlashContractError, match=message) as caught:
        check_flash_contract(q, k, v, paddle.zeros(mask_shape), False)
    assert "\n" not in str(caught.value)


def test_mask_dtype_causal_and_shapes_are_checked():
    q, k, v = tensors()
    with pytest.raises(FlashContractError, match="mask dtype"):
        check_flash_contract(q, k, v, paddle.zeros([B, 1, 5, 7], dtype="float64"), False)
    with pytest.raises(FlashContractError, match="either is_causal or a mask"):
        check_flash_contract(q, k, v, paddle.zeros([B, 1, 5, 7]), True)
    with pytest.raises(FlashContractError, match="square"):
        check_flash_contract(q, k, v, None, True)
    check_flash_contract(*tensors(q_len=7), None, True)
    with pytest.raises(FlashContractError, match="one dtype"):
        check_flash_contract(q, k, v.astype("float64"), None, False)
    with pytest.raises(FlashContractError, match="shapes disagree"):
        check_flash_contract(q, k[:1], v[:1], None, False)


def test_low_precision_masks_are_cast_to_q_dtype_before_the_check():
    """A bfloat16 call (what the 7B recipes run) hands the kernel a bfloat16 mask."""
    q, k, v = tensors(dtype="bfloat16")
    bias = paddle.zeros([B, 1, 5, 7])
    check_flash_contract(q, k, v, attention_module.sdpa_mask(bias, q.dtype), False)
    with pytest.raises(FlashContractError, match="dtype"):
        check_flash_contract(q, k, v, bias, False)


def test_flash_attention_3_takes_masked_calls_to_the_plain_expression(monkeypatch):
    """FLAGS_flash_attn_version=3 refuses every dense mask: masked calls take the plain expression
    (same values), unmasked ones stay on the fused kernel."""
    rng = np.random.default_rng(1)
    q, k, v = (paddle.to_tensor(rng.standard_normal((B, H, n, D)).astype(np.float32)) for n in (5, 7, 7))
    bias = paddle.to_tensor(np.where(rng.random((B, 1, 5, 7)) < 0.3, attention_module.MASK_VALUE, 0.0)
                            .astype(np.float32))
    expected = attention_module.plain_attention(q, k, v, 0.5, bias).numpy()
    fused_calls = []
    real_sdpa = attention_module.F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda *a, **kw: fused_calls.append(kw.get("attn_mask")) or real_sdpa(*a, **kw))
    monkeypatch.setattr(attention_module, "flash_attn_version", lambda: 3)
    np.testing.assert_allclose(attention_module.fused_attention(q, k, v, 0.5, bias).numpy(), expected,
                               rtol=1e-5, atol=1e-6)
    assert fused_calls == []
    attention_module.fused_attention(q, k, v, 0.5)
    assert len(fused_calls) == 1 and fused_calls[0] is None


def test_flash_attention_version_reads_the_flag_or_defaults_to_2():
    assert attention_module.flash_attn_version() == 2  # a CPU build has no such flag


# ------------------------------------------------------------- every GPU path, through the check
@pytest.fixture
def recorded(monkeypatch):
    """Paddle's kernels (what a GPU runs), with every fused-attention call's shapes recorded; the
    real check still runs and raises."""
    calls = []
    real = attention_module.check_flash_contract

    def spy(q, k, v, mask, is_causal):
        calls.append({"q": list(q.shape), "k": list(k.shape),
                      "mask": None if mask is None else list(mask.shape), "causal": is_causal})
        real(q, k, v, mask, is_causal)

    monkeypatch.setattr(attention_module, "check_flash_contract", spy)
    with paddle_kernels():
        yield calls


@pytest.fixture(scope="module")
def model():
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(3)
    m = MgenVLForCausalLM(small_config())
    m.eval()
    return m


def prompts_for(model, equal: bool, n=2):
    rng = np.random.default_rng(7)
    shapes = [(3, 4)] * n if equal else [(3, 4), (1, 2), (5, 1)][:n]
    return random_image_prompts(model.config, rng, shapes)


def decoder_calls(calls):
    """The decoder's calls (the ViT and resampler attend without masks, over other lengths)."""
    return [c for c in calls if c["mask"] is not None or c["causal"]]


@pytest.mark.parametrize("equal", [True, False], ids=["equal_length", "left_padded"])
def test_prefill_and_cached_decode(recorded, model, equal):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.generate import generate

    prompts, images = prompts_for(model, equal)
    cfg = GenerationConfig(max_new_tokens=4, stop_ids=(), pad_id=0)
    out = generate(model, prompts, images, cfg)
    assert [len(t) for t in out] == [4, 4]
    decode_masks = [c["mask"] for c in decoder_calls(recorded) if c["q"][1] == 1]
    assert decode_masks and all(m[0] == len(prompts) for m in decode_masks), decode_masks
    # every decode step of the batch of 2 sent a [2, 1, 1, K] mask
    assert {tuple(m[:3]) for m in decode_masks} == {(2, 1, 1)}


def test_equal_length_batch_decodes_like_one_by_one(recorded, model):
    """The batch-axis fix changes no token: batched greedy = one-by-one greedy, on Paddle's kernels."""
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.generate import generate

    prompts, images = prompts_for(model, equal=True)
    cfg = GenerationConfig(max_new_tokens=5, stop_ids=(), pad_id=0)
    batched = generate(model, prompts, images, cfg)
    alone = [generate(model, [p], images[i:i + 1], cfg)[0] for i, p in enumerate(prompts)]
    assert batched == alone


class EchoDrafter:
    """Drafts the tokens of a known continuation, with one wrong token, so verification both accepts
    and rolls back."""

    name = "echo"
    num_draft_tokens = 3

    def __init__(self, answers):
        self.answers = answers

    def propose(self, rows, limits):
        drafts = []
        for row, limit in zip(rows, limits):
            draft = list(self.answers[row.tag][len(row.tokens):len(row.tokens) + min(limit, 3)])
            if len(draft) == 3:
                draft[2] = (draft[2] + 1) % 900
            drafts.append(draft)
        return drafts


@pytest.mark.parametrize("equal", [True, False], ids=["equal_length", "left_padded"])
def test_speculative_verify_and_continuous_batching(recorded, model, equal):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.generate import generate
    from paddle_caption.decoding.scheduler import ContinuousBatch

    prompts, images = prompts_for(model, equal, n=3)
    cfg = GenerationConfig(max_new_tokens=6, stop_ids=(), pad_id=0)
    answers = {i: generate(model, [p], images[i:i + 1], cfg)[0] for i, p in enumerate(prompts)}
    recorded.clear()
    batch = ContinuousBatch(model, 0, drafter=EchoDrafter(answers))
    rows = batch.add(prompts[:2], images[:2], [cfg, cfg], tags=[0, 1])
    batch.step()
    rows += batch.add(prompts[2:], images[2:], [cfg], tags=[2])  # joins a running batch
    with paddle.no_grad():
        while batch:
            batch.step()
    assert {row.tag: row.tokens for row in rows} == answers
    verify = [c for c in decoder_calls(recorded) if c["q"][1] > 1 and c["mask"] is not None
              and c["k"][1] > c["q"][1]]
    assert verify, "no multi-token verify step ran"
    assert all(c["mask"][0] == c["q"][0] for c in decoder_calls(recorded) if c["mask"] is not None)


@pytest.mark.parametrize("padded", [False, True], ids=["equal_length", "right_padded"])
@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_training_forward_and_backward(recorded, padded, recompute):
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(5)
    model = MgenVLForCausalLM(small_config())
    if recompute:
        model.enable_recompute()
    model.train()
    prompts, images = random_image_prompts(model.config, np.random.default_rng(2), [(3, 4), (3, 4)])
    ids = np.asarray(prompts, dtype=np.int64)
    mask = np.ones_like(ids)
    if padded:
        mask[1, -2:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :ids.shape[1] - 4] = -100
    out = model(paddle.to_tensor(ids), images=images, attention_mask=paddle.to_tensor(mask),
                labels=paddle.to_tensor(labels))
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    decoder = decoder_calls(recorded)
    # causal layers without a mask; the last layer's loss-position queries with a [B, 1, Q, K] mask
    assert any(c["causal"] and c["mask"] is None for c in decoder)
    assert all(c["mask"][0] == 2 for c in decoder if c["mask"] is not None)
