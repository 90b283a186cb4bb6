"""The model: parity with PaddleMIX's qwen_vl, the image scatter, padding, KV cache, checkpoints.

Every numerical test takes the `kernels` fixture, so it runs on both kernel paths: the numpy CPU
kernels and Paddle's own (fused attention, Paddle RoPE and head: what a GPU runs)."""
from __future__ import annotations

import numpy as np
import pytest

from paddle_caption.runtime import UserError
from tests.conftest import small_config

import paddle

IMG, IMG_END, PAD = 990, 991, 992


def image_prompt(prefix, suffix, n=256):
    return list(prefix) + [IMG] + [PAD] * n + [IMG_END] + list(suffix)


# ---- parity with the PaddleMIX reference ---------------------------------------------------------
def test_visual_output_matches_reference(reference_model, reference_io, kernels):
    inputs, outputs = reference_io
    with paddle.no_grad():
        visual = reference_model.visual(paddle.to_tensor(inputs["images"])).numpy()
    np.testing.assert_allclose(visual, outputs["visual_out"], rtol=0, atol=1e-5)


def test_logits_match_reference(reference_model, reference_io, kernels):
    inputs, outputs = reference_io
    with paddle.no_grad():
        logits = reference_model(paddle.to_tensor(inputs["input_ids"]),
                                 images=paddle.to_tensor(inputs["images"])).logits.numpy()
    np.testing.assert_allclose(logits, outputs["logits"], rtol=0, atol=1e-5)


def test_loss_matches_reference(reference_model, reference_io, kernels):
    inputs, outputs = reference_io
    with paddle.no_grad():
        loss = reference_model(paddle.to_tensor(inputs["input_ids"]), images=paddle.to_tensor(inputs["images"]),
                               labels=paddle.to_tensor(inputs["labels"])).loss.item()
    # Our loss is the masked mean over the 16 supervised positions; the reference divides by all 546.
    assert abs(loss - 7.3739742) < 1e-5
    assert abs(loss * 16 / 546 - float(outputs["loss"])) < 1e-6


def test_greedy_tokens_match_reference(reference_model, reference_io, kernels):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.generate import generate

    inputs, outputs = reference_io
    prompt = inputs["input_ids"][0].tolist()
    cfg = GenerationConfig(max_new_tokens=6, stop_ids=(), pad_id=0)
    new = generate(reference_model, [prompt], paddle.to_tensor(inputs["images"][:1]), cfg)
    assert new[0] == outputs["greedy_ids"][0].tolist()


# ---- the image-text interaction ------------------------------------------------------------------
def test_scatter_writes_visual_rows_and_keeps_text_rows(reference_model, reference_io):
    inputs, _ = reference_io
    ids = paddle.to_tensor(inputs["input_ids"])
    images = paddle.to_tensor(inputs["images"])
    with paddle.no_grad():
        embeds = reference_model.embed(ids, images).numpy()
        visual = reference_model.visual(images).numpy()
        token_embeds = reference_model.transformer.llm.wte(ids).numpy()
    for row in range(2):
        start = int(np.flatnonzero(inputs["input_ids"][row] == IMG)[0])
        end = int(np.flatnonzero(inputs["input_ids"][row] == IMG_END)[0])
        assert end - start == 257
        np.testing.assert_array_equal(embeds[row, start + 1:end], visual[row])
        outside = np.r_[0:start + 1, end:embeds.shape[1]]
        np.testing.assert_array_equal(embeds[row, outside], token_embeds[row, outside])


def test_image_is_used_in_logits_and_gradients(reference_model, reference_io, kernels):
    inputs, _ = reference_io
    ids = paddle.to_tensor(inputs["input_ids"][:1])
    img_a = paddle.to_tensor(inputs["images"][:1])
    img_b = paddle.to_tensor(inputs["images"][1:2])
    with paddle.no_grad():
        logits_a = reference_model(ids, images=img_a).logits.numpy()[0, -8:]
        logits_b = reference_model(ids, images=img_b).logits.numpy()[0, -8:]
    assert np.abs(logits_a - logits_b).max() > 1e-2
    loss = reference_model(ids, images=img_a, labels=paddle.to_tensor(inputs["labels"][:1])).loss
    loss.backward()
    grad = reference_model.visual.attn_pool.query.grad
    assert grad is not None and float(paddle.abs(grad).sum()) > 0
    reference_model.clear_gradients()


def test_image_span_without_image_is_an_error(reference_model, reference_io):
    inputs, _ = reference_io
    ids = paddle.to_tensor(inputs["input_ids"])
    with pytest.raises(ValueError, match="silent text-only"):
        reference_model(ids)
    with pytest.raises(ValueError, match="2 image span"):
        reference_model(ids, images=paddle.to_tensor(inputs["images"][:1]))
    broken = inputs["input_ids"][:1].copy()
    broken[0, 100] = 5  # a placeholder missing from the span is still a span of the wrong length
    broken[0, 260] = 5  # drop </img>
    with pytest.raises(ValueError, match="malformed image span"):
        reference_model(paddle.to_tensor(broken), images=paddle.to_tensor(inputs["images"][:1]))


def test_ablation_writes_zero_rows():
    from paddle_caption import MgenVLForCausalLM


    model = MgenVLForCausalLM(small_config(ablate_images=True))
    ids = paddle.to_tensor([image_prompt([1, 2], [3])])
    with paddle.no_grad():
        embeds = model.embed(ids, paddle.randn([1, 3, 56, 56])).numpy()
    assert np.all(embeds[0, 3:3 + 256] == 0)
    assert np.abs(embeds[0, :3]).sum() > 0


# ---- padding, cache, loss ------------------------------------------------------------------------
def test_left_padding_matches_unpadded(reference_model, kernels):
    rng = np.random.default_rng(5)
    short = image_prompt(rng.integers(0, 900, 3), rng.integers(0, 900, 5))
    long = image_prompt(rng.integers(0, 900, 9), rng.integers(0, 900, 12))
    images = paddle.to_tensor(rng.standard_normal((2, 3, 56, 56)).astype("float32"))
    from paddle_caption.decoding.batch import left_pad

    ids, mask = left_pad([short, long], pad_id=0)
    with paddle.no_grad():
        batched = reference_model(paddle.to_tensor(ids), images=images,
                                  attention_mask=paddle.to_tensor(mask)).logits.numpy()[:, -1]
        alone = [reference_model(paddle.to_tensor([p]), images=images[i:i + 1]).logits.numpy()[0, -1]
                 for i, p in enumerate([short, long])]
    np.testing.assert_allclose(batched[0], alone[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched[1], alone[1], rtol=0, atol=1e-5)


def test_kv_cache_matches_full_forward(reference_model, kernels):
    rng = np.random.default_rng(6)
    prompt = image_prompt(rng.integers(0, 900, 4), rng.integers(0, 900, 6))
    follow = rng.integers(0, 900, 5).tolist()
    image = paddle.to_tensor(rng.standard_normal((1, 3, 56, 56)).astype("float32"))
    with paddle.no_grad():
        full = reference_model(paddle.to_tensor([prompt + follow]), images=image).logits.numpy()[0]
        out = reference_model(paddle.to_tensor([prompt]), images=image, use_cache=True)
        past, mask = out.past_key_values, paddle.ones([1, len(prompt)], dtype="int64")
        steps = []
        for token in follow:
            mask = paddle.concat([mask, paddle.ones([1, 1], dtype="int64")], axis=1)
            out = reference_model(paddle.to_tensor([[token]]), attention_mask=mask,
                                  past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits.numpy()[0, -1])
    np.testing.assert_allclose(np.stack(steps), full[len(prompt):], rtol=0, atol=1e-5)


def test_last_logits_only_prefill_gives_the_same_logits_and_cache(reference_model, kernels):
    """Generation's prefill runs the last layer for the last row only; its logits and every
    layer's cached keys/values must equal the full forward's, left padding included."""
    from paddle_caption.decoding.batch import left_pad

    rng = np.random.default_rng(7)
    prompts = [image_prompt(rng.integers(0, 900, 2), rng.integers(0, 900, 4)),
               image_prompt(rng.integers(0, 900, 6), rng.integers(0, 900, 9))]
    ids, mask = (paddle.to_tensor(a) for a in left_pad(prompts, pad_id=0))
    images = paddle.to_tensor(rng.standard_normal((2, 3, 56, 56)).astype("float32"))
    with paddle.no_grad():
        full = reference_model(ids, images=images, attention_mask=mask, use_cache=True)
        last = reference_model(ids, images=images, attention_mask=mask, use_cache=True, last_logits_only=True)
    assert last.logits.shape[1] == 1
    np.testing.assert_allclose(last.logits.numpy()[:, 0], full.logits.numpy()[:, -1], rtol=0, atol=1e-5)
    for (k_full, v_full), (k_last, v_last) in zip(full.past_key_values, last.past_key_values):
        np.testing.assert_allclose(k_last.numpy(), k_full.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(v_last.numpy(), v_full.numpy(), rtol=0, atol=1e-6)


def _loss_and_grads(model, ids, loss_on, **kwargs):
    model.clear_gradients()
    loss = model(ids, loss_on=loss_on, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return loss.item(), grads


def test_supervised_only_head_gives_the_full_loss_and_gradients(reference_io, kernels):
    """The fused supervised-rows head (numpy on CPU) == full logits + Paddle cross-entropy, with right
    padding and answers of different lengths in one batch."""
    from paddle_caption import MgenVLForCausalLM

    inputs, _ = reference_io
    paddle.seed(3)
    model = MgenVLForCausalLM(small_config())
    labels = inputs["labels"].copy()
    mask = np.ones_like(inputs["input_ids"])
    answer = np.flatnonzero(labels[1] != -100)
    labels[1, answer[-5:]] = -100  # row 1: a shorter answer followed by right padding
    mask[1, answer[-5:]] = 0
    kwargs = dict(images=paddle.to_tensor(inputs["images"]), labels=paddle.to_tensor(labels),
                  attention_mask=paddle.to_tensor(mask))
    ids = paddle.to_tensor(inputs["input_ids"])
    sparse_loss, sparse_grads = _loss_and_grads(model, ids, "supervised", **kwargs)
    full_loss, full_grads = _loss_and_grads(model, ids, "all", **kwargs)
    assert abs(sparse_loss - full_loss) < 1e-5
    assert sparse_grads.keys() == full_grads.keys() and "lm_head.weight" in sparse_grads
    for name, grad in full_grads.items():
        np.testing.assert_allclose(sparse_grads[name], grad, rtol=1e-4, atol=1e-6, err_msg=name)


def test_transposed_head_few_rows_route_equals_the_plain_product_and_is_dropped_after():
    """generate() keeps lm_head transposed: 2-32 rows go through a transposed copy of its weight
    (the fast BLAS layout); the same logits, and the copy lives only as long as the block."""
    from paddle_caption.decoding.output_head import FEW_ROWS, keep_transposed_head, transposed_head
    from paddle_caption.model.head import project

    paddle.seed(4)
    head = paddle.nn.Linear(48, 20000, bias_attr=False)
    with paddle.no_grad():
        for rows in (1, 2, 7, FEW_ROWS[1], FEW_ROWS[1] + 1):
            hidden = paddle.randn([rows, 48])
            want = head(hidden).numpy()
            with transposed_head(head):
                with transposed_head(head):  # nests
                    got = project(hidden, head).numpy()
                assert head._paddle_caption_transposed_weight is not None
            assert head._paddle_caption_transposed_weight is None
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        keep_transposed_head(head)
        with transposed_head(head):
            pass
        assert head._paddle_caption_transposed_weight is not None  # a model loaded for inference keeps it


def test_logits_index_returns_the_logits_of_those_positions_only(reference_model, reference_io, kernels):
    inputs, _ = reference_io
    ids, images = paddle.to_tensor(inputs["input_ids"]), paddle.to_tensor(inputs["images"])
    index = np.array([0, 5, ids.shape[1] + 3, 2 * ids.shape[1] - 1])  # flat: row * T + column
    with paddle.no_grad():
        full = reference_model(ids, images=images)
        some = reference_model(ids, images=images, logits_index=index)
    flat = full.logits.numpy().reshape(-1, full.logits.shape[-1])
    np.testing.assert_allclose(some.logits.numpy(), flat[index], rtol=1e-5, atol=1e-5)


# ---- checkpoints ---------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(reference_model, reference_io, tmp_path):
    from paddle_caption import MgenVLForCausalLM

    inputs, _ = reference_io
    reference_model.save_pretrained(tmp_path / "single")
    reference_model.save_pretrained(tmp_path / "sharded", max_shard_bytes=400_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    ids, images = paddle.to_tensor(inputs["input_ids"]), paddle.to_tensor(inputs["images"])
    with paddle.no_grad():
        expected = reference_model(ids, images=images).logits.numpy()
        for name in ("single", "sharded"):
            loaded = MgenVLForCausalLM.from_pretrained(tmp_path / name)
            np.testing.assert_array_equal(loaded(ids, images=images).logits.numpy(), expected)


def test_pickle_checkpoints_load_as_arrays_and_anything_more_needs_allow_pickle(reference_model, tmp_path):
    """A `paddle.save` state dict loads through the array-only unpickler, no flag; a pickle that
    names any other callable is refused by name unless allow_pickle (then Paddle's own unpickler)."""
    import pickle

    from paddle_caption import MgenVLForCausalLM

    reference_model.config.save_pretrained(tmp_path)
    paddle.save(reference_model.state_dict(), str(tmp_path / "model_state.pdparams"))
    loaded = MgenVLForCausalLM.from_pretrained(tmp_path)
    for key, value in reference_model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    state = {k: v.numpy() for k, v in reference_model.state_dict().items()}
    state["extra"] = paddle.nn.initializer.Constant  # a class reference: more than arrays
    with open(tmp_path / "model_state.pdparams", "wb") as handle:
        pickle.dump(state, handle, protocol=4)
    with pytest.raises(UserError, match=r"refusing to unpickle paddle\.nn\.initializer.*Constant.*--allow_pickle"):
        MgenVLForCausalLM.from_pretrained(tmp_path)
    del state["extra"]
    with open(tmp_path / "model_state.pdparams", "wb") as handle:
        pickle.dump({**state, "StructuredToParameterName@@": {"a": "b"}}, handle, protocol=4)
    assert MgenVLForCausalLM.from_pretrained(tmp_path).num_parameters() == reference_model.num_parameters()


def test_mismatching_checkpoint_names_the_key(reference_model, tmp_path):
    from paddle_caption import MgenVLForCausalLM


    MgenVLForCausalLM(small_config(num_hidden_layers=2)).save_pretrained(tmp_path)
    reference_model.config.save_pretrained(tmp_path)  # claims 3 layers
    with pytest.raises(UserError, match="missing key 'transformer.llm.h.2"):
        MgenVLForCausalLM.from_pretrained(tmp_path)


def test_unknown_format_and_unknown_config_key(tmp_path):
    from paddle_caption import MgenVLConfig
    from paddle_caption.model.weights_io import load_model_state

    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        load_model_state(tmp_path / "weights.onnx")
    with pytest.raises(UserError, match="model config: unknown key 'hiden_size'"):
        MgenVLConfig.from_dict({"hiden_size": 3})



def test_target_logprobs_numpy_and_paddle_paths_agree():
    """Per-row target log-probabilities: the numpy CPU path equals Paddle's log-softmax path."""
    from paddle_caption.model.head import linear_target_logprobs, paddle_target_logprobs, use_numpy_head

    paddle.seed(11)
    linear = paddle.nn.Linear(16, 300, bias_attr=False)
    rows = paddle.randn([7, 16])
    targets = np.array([0, 5, 299, 17, 17, 100, 3])
    assert use_numpy_head(linear)
    numpy_path = linear_target_logprobs(rows, linear, targets)
    paddle_path = paddle_target_logprobs(rows, linear, targets)
    np.testing.assert_allclose(numpy_path, paddle_path, rtol=0, atol=1e-5)
    logits = rows.numpy() @ linear.weight.numpy()
    expected = logits[np.arange(7), targets] - np.log(np.exp(logits).sum(axis=1))
    np.testing.assert_allclose(numpy_path, expected, rtol=0, atol=1e-5)
    assert np.all(numpy_path < 0)


def test_sequence_logprobs_sum_to_the_loss(reference_io):
    """Per-row sums of supervised log-probabilities agree with the training loss (its token mean),
    and each row's numbers do not depend on the other rows of the batch."""
    from paddle_caption import MgenVLForCausalLM

    inputs, _ = reference_io
    paddle.seed(4)
    model = MgenVLForCausalLM(small_config())
    model.eval()
    labels = inputs["labels"].copy()
    mask = np.ones_like(inputs["input_ids"])
    answer = np.flatnonzero(labels[1] != -100)
    labels[1, answer[-5:]] = -100
    mask[1, answer[-5:]] = 0
    ids, images = paddle.to_tensor(inputs["input_ids"]), paddle.to_tensor(inputs["images"])
    sums, counts = model.sequence_logprobs(ids, images, paddle.to_tensor(mask), paddle.to_tensor(labels))
    assert list(counts) == [int((labels[r, 1:] != -100).sum()) for r in range(len(labels))]
    with paddle.no_grad():
        loss = model(ids, images=images, attention_mask=paddle.to_tensor(mask), labels=paddle.to_tensor(labels)).loss
    assert abs(-sums.sum() / counts.sum() - float(loss)) < 1e-5
    alone, n = model.sequence_logprobs(ids[:1], images[:1], paddle.to_tensor(mask[:1]), paddle.to_tensor(labels[:1]))
    assert n[0] == counts[0] and abs(alone[0] - sums[0]) < 1e-4
