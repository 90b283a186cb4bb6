"""Recompute (activation checkpointing per decoder and ViT layer): the same loss and gradients with
and without it, on both kernel paths, and it really reruns the blocks (and only in training)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import small_config

import paddle


def batch(config, rng, rows=2):
    span = [config.image_start_id] + [config.image_pad_id] * config.visual.n_queries + [config.image_end_id]
    ids = np.array([list(rng.integers(0, 900, 5)) + span + list(rng.integers(0, 900, 9)) for _ in range(rows)])
    labels = np.full_like(ids, -100)
    labels[:, -8:] = ids[:, -8:]
    mask = np.ones_like(ids)
    mask[1, -3:] = 0  # right padding in row 1
    labels[1, -3:] = -100
    size = config.visual.image_size
    images = rng.standard_normal((rows, 3, size, size)).astype("float32")
    return {k: paddle.to_tensor(v) for k, v in
            dict(input_ids=ids, labels=labels, attention_mask=mask, images=images).items()}


def loss_and_grads(model, inputs):
    model.clear_gradients()
    loss = model(inputs["input_ids"], images=inputs["images"], attention_mask=inputs["attention_mask"],
                 labels=inputs["labels"]).loss
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return loss.item(), grads


def count_block_calls(model):
    calls = {"decoder": 0, "vit": 0}
    hooks = [block.register_forward_post_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
             for key, blocks in (("decoder", model.transformer.llm.h), ("vit", model.visual.vit.transformer.resblocks))
             for block in blocks]
    return calls, hooks


@pytest.mark.parametrize("frozen", [[], ["transformer.llm.wte.*", "visual.*", "transformer.llm.h.0.*"]])
def test_recompute_gives_the_same_loss_and_gradients(kernels, frozen):
    """Everything trainable, and the "upper layers only" shape of the 16-31 recipe (the first
    trainable layer's input carries no gradient, so it runs without recompute)."""
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train.freeze import apply_freezing

    paddle.seed(11)
    config = small_config(num_hidden_layers=3, attn_dropout_prob=0.0)
    model = MgenVLForCausalLM(config)
    apply_freezing(model, ["*"], frozen, "full")
    model.train()
    inputs = batch(config, np.random.default_rng(0))

    plain_loss, plain = loss_and_grads(model, inputs)
    calls, hooks = count_block_calls(model)
    model.enable_recompute()
    recomputed_loss, recomputed = loss_and_grads(model, inputs)
    for hook in hooks:
        hook.remove()

    assert recomputed_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == recomputed.keys() and plain
    for name, grad in plain.items():
        np.testing.assert_allclose(recomputed[name], grad, rtol=1e-5, atol=1e-7, err_msg=name)
    # forward + rerun in backward: every checkpointed block ran twice
    if frozen:  # layer 0 frozen and fed by frozen embeddings: no graph; layer 1 not recomputed; 2 is
        assert calls == {"decoder": 3 + 1, "vit": config.visual.layers}
    else:
        assert calls == {"decoder": 2 * 3, "vit": 2 * config.visual.layers}


def test_recompute_is_inert_outside_training():
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(12)
    config = small_config(num_hidden_layers=2)
    model = MgenVLForCausalLM(config).enable_recompute()
    inputs = batch(config, np.random.default_rng(1))
    calls, hooks = count_block_calls(model)
    model.eval()
    loss_and_grads(model, inputs)  # eval mode: a plain forward and backward
    with paddle.no_grad():
        model.train()
        model(inputs["input_ids"], images=inputs["images"], labels=inputs["labels"])  # no gradient: plain
    for hook in hooks:
        hook.remove()
    assert calls == {"decoder": 2 * 2, "vit": 2 * config.visual.layers}
    assert model.transformer.llm.recompute and model.enable_recompute(False).transformer.llm.recompute is False


@pytest.mark.parametrize("mode", [dict(finetune_mode="full"), dict(finetune_mode="lora", lora_r=4, lora_alpha=8)],
                         ids=["full", "lora"])
def test_a_training_run_with_recompute_ends_with_the_same_weights(tmp_path, caption_data, mode):
    """`recompute: true` in a config: the trainer turns it on (under LoRA on the wrapped base model)
    and a short float32 run with dropout ends where the same run without recompute does."""
    from paddle_caption.train.model_init import initial_model

    from .conftest import micro_model_json
    from .test_train import base_config, state_of, train

    model_config = str(micro_model_json(tmp_path, num_hidden_layers=2, attn_dropout_prob=0.1))
    ends = {}
    for recompute in (False, True):
        cfg = base_config(tmp_path, caption_data, model_config=model_config, max_steps=3, recompute=recompute,
                          output_dir=str(tmp_path / f"run-{recompute}"), **mode)
        trainer, _ = train(cfg)
        assert trainer.base_model.transformer.llm.recompute is recompute
        ends[recompute] = state_of(trainer.model)
    assert ends[False].keys() == ends[True].keys()
    for name, value in ends[False].items():
        np.testing.assert_allclose(ends[True][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # and the runs did train: equal end points are not both the start (lora_B starts at zero)
    start = state_of(initial_model(None, model_config, 0)[0])
    origins = {name: np.zeros_like(ends[True][name]) if name.endswith("lora_B") else start.get(name)
               for name, _ in trainer.named_trainable}
    assert [n for n, origin in origins.items() if origin is not None and not np.array_equal(ends[True][n], origin)]
