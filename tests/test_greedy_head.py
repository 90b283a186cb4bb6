"""GreedyHead: greedy tokens from hidden states without the full output layer, always the full
product's argmax (decoding/greedy_head.py)."""
import numpy as np
import pytest


def fixture_pixels(predictor, root, n):
    """The first n test images of a trained fixture, as the model's pixel tensor."""
    from paddle_caption.predict.inputs import load_batch, read_test_rows

    rows = read_test_rows(root / "tsv" / "test.tsv")[:n]
    with open(root / "tsv" / "test.tsv", "rb") as handle:
        images, _ = load_batch(handle.fileno(), rows, predictor.preprocess, max_pixels=1 << 24, min_side=0)
    return predictor.pixels([images[row.id] for row in rows])


def clustered_head(vocab=4096, width=16, far=(7, 300, 2000), seed=0):
    """A head like a trained model's: a few rows far from a common centre, the rest within ~0.05."""
    from paddle_caption.decoding.greedy_head import GreedyHead

    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(width).astype(np.float32)
    weight_t = centre + 0.01 * rng.standard_normal((vocab, width)).astype(np.float32)
    for token in far:
        weight_t[token] = 3 * rng.standard_normal(width).astype(np.float32)
    weight_t = np.ascontiguousarray(weight_t)
    return GreedyHead(np.ascontiguousarray(weight_t.T), weight_t), weight_t


def test_far_rows_start_hot_and_certify_rows_that_pick_them():
    head, weight_t = clustered_head()
    assert list(head._hot[0]) == [7, 300, 2000]
    hidden = 2 * weight_t[[7, 300, 2000, 300]]  # each row points at one far token
    want = (hidden @ weight_t.T).argmax(axis=1)
    assert list(head.argmax(hidden)) == list(want) == [7, 300, 2000, 300]
    assert head.counts == {"certified": 4, "full": 0}


def test_a_cold_winner_falls_back_to_the_full_product_and_joins_the_hot_set():
    head, weight_t = clustered_head()
    # a hidden state along one near-centre row's own deviation: that cold token wins
    target = 1234
    hidden = 50 * (weight_t[target] - weight_t.mean(axis=0))[None]
    want = int((hidden @ weight_t.T).argmax())
    got = head.argmax(hidden)
    assert int(got[0]) == want and head.counts["full"] == 1
    assert want in set(head._hot[0].tolist())
    # hot now; whether the bound can certify it depends on the rest (here: rows as far as it, so no)
    assert int(head.argmax(hidden)[0]) == want


def test_ties_between_hot_tokens_go_to_the_lowest_id_like_numpy_argmax():
    head, weight_t = clustered_head()
    weight_t = weight_t.copy()
    weight_t[2000] = weight_t[300]  # two equal far rows
    from paddle_caption.decoding.greedy_head import GreedyHead

    head = GreedyHead(np.ascontiguousarray(weight_t.T), weight_t)
    hidden = 2 * weight_t[[300]]
    assert int(head.argmax(hidden)[0]) == int((hidden @ weight_t.T).argmax()) == 300


def test_random_weights_stay_exact_and_the_head_gives_up_certifying():
    from paddle_caption.decoding.greedy_head import WINDOW, GreedyHead

    rng = np.random.default_rng(1)
    weight_t = rng.standard_normal((2048, 16)).astype(np.float32)
    head = GreedyHead(np.ascontiguousarray(weight_t.T), weight_t)
    for _ in range(WINDOW // 64 + 2):
        hidden = rng.standard_normal((64, 16)).astype(np.float32)
        np.testing.assert_array_equal(head.argmax(hidden), (hidden @ weight_t.T).argmax(axis=1))
    assert not head.enabled  # nothing clusters: full products only from here on
    hidden = rng.standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_array_equal(head.argmax(hidden), (hidden @ weight_t.T).argmax(axis=1))


def test_trained_model_greedy_tokens_equal_the_full_argmax_without_computing_logits(trained_micro):
    """On a trained model the head certifies most rows; DecodeBatch's forwards skip the output layer
    and compute logits only when asked, and those logits' argmax is what greedy() gave."""
    import paddle

    from paddle_caption.decoding.batch import DecodeBatch
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.predict.predictor import load_predictor

    predictor = load_predictor(trained_micro / "model", GenerationConfig(max_new_tokens=8))
    batch = DecodeBatch(predictor.model, predictor.tokenizer.pad_id)
    assert batch.head is not None
    batch.add([predictor.prompt_ids] * 8, fixture_pixels(predictor, trained_micro, 8))
    head_matrix = predictor.model.lm_head.weight.numpy()
    for _ in range(6):
        assert batch.out._logits is None  # the forward skipped the output layer
        tokens = batch.greedy()
        full = batch.hidden @ head_matrix
        np.testing.assert_array_equal(tokens, full.argmax(axis=1))
        np.testing.assert_allclose(batch.logits, full, rtol=1e-5, atol=1e-4)  # computed on demand
        batch.step(tokens)
    fed = np.stack([batch.greedy()] * 3, axis=1)
    outputs = batch.step_many(fed, np.array([3, 1, 2, 3, 3, 1, 2, 3]))
    np.testing.assert_array_equal(outputs.greedy(), (outputs.hidden @ head_matrix).argmax(axis=1))
    assert batch.head.counts["certified"] > batch.head.counts["full"]
    with paddle.no_grad():
        assert DecodeBatch(predictor.model, 0).head is batch.head  # one per kept head, shared


@pytest.mark.parametrize("kernels", ["paddle"], indirect=True)
def test_paddle_kernels_take_full_logits(trained_micro, kernels):
    """On Paddle's head path (a GPU's) there is no greedy head: the forward returns logits."""
    from paddle_caption.decoding.batch import DecodeBatch
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.predict.predictor import load_predictor

    predictor = load_predictor(trained_micro / "model", GenerationConfig(max_new_tokens=8))
    batch = DecodeBatch(predictor.model, predictor.tokenizer.pad_id)
    assert batch.head is None
    batch.add([predictor.prompt_ids] * 2, fixture_pixels(predictor, trained_micro, 2))
    assert batch.out._logits is not None
    np.testing.assert_array_equal(batch.greedy(), batch.logits.argmax(axis=1))
