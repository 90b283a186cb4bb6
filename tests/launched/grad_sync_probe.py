"""Run under `paddle.distributed.launch --nproc_per_node 2` by tests/test_data_parallel.py.

Checks the trainer's gradient contract on real ranks, with recompute off and on (the combination
that used to die in DataParallel's reducer): after every micro-step inside `micro_step(...)` each
rank holds its own accumulated gradients (nothing was all-reduced, on any micro-step); after
`reduce_gradients` every rank holds the same gradients, equal to the mean of the ranks' own. Exits
non-zero on any violation; rank 0 prints a line the test looks for.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from paddle_caption.runtime import configure

paddle = configure(1)
dist = paddle.distributed


def gathered(values: np.ndarray) -> list[np.ndarray]:
    out = []
    dist.all_gather(out, paddle.to_tensor(values))
    return [t.numpy() for t in out]


def check(config, recompute: bool, rank: int) -> int:
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train.parallel import micro_step, reduce_gradients, wrap_for_training

    paddle.seed(0)
    model = MgenVLForCausalLM(config)
    if recompute:
        model.enable_recompute()
    model.train()
    module, _ = wrap_for_training(model, None, dist.get_world_size())
    n = config.visual.n_queries
    rng = np.random.default_rng(rank)  # each rank its own data

    def one_micro_step():
        words = rng.integers(100, 1000, size=6)
        ids = [config.image_start_id] + [config.image_pad_id] * n + [config.image_end_id] + words.tolist()
        labels = [-100] * (n + 2) + words.tolist()
        images = paddle.to_tensor(rng.standard_normal((1, 3, config.visual.image_size,
                                                       config.visual.image_size)).astype("float32"))
        with micro_step(module):
            module(paddle.to_tensor([ids]), images=images, labels=paddle.to_tensor([labels])).backward()

    params = [p for p in model.parameters() if not p.stop_gradient]
    grads = lambda: np.concatenate([p.grad.numpy().ravel() for p in params])  # noqa: E731

    for _ in range(2):  # two accumulation micro-steps: nothing is reduced on either
        one_micro_step()
        mine = gathered(grads())
        assert not np.allclose(mine[0], mine[1]), "gradients were all-reduced on a micro-step"
    expected = (mine[0] + mine[1]) / 2
    reduce_gradients(module, params)
    after = gathered(grads())
    np.testing.assert_array_equal(after[0], after[1], err_msg="ranks differ after reduce_gradients")
    np.testing.assert_allclose(after[0], expected, rtol=1e-5, atol=1e-7,
                               err_msg="the reduced gradient is not the mean over the ranks")
    return len(params)


def main(model_json: str) -> int:
    from paddle_caption.model.config import MgenVLConfig

    dist.init_parallel_env()
    rank = dist.get_rank()
    config = MgenVLConfig.from_pretrained(model_json)
    counts = {f"recompute={flag}": check(config, flag, rank) for flag in (False, True)}
    if rank == 0:
        print(json.dumps({"grad_sync_probe": "passed", "params": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
