"""Run under `paddle.distributed.launch --nproc_per_node 2` by tests/test_data_parallel.py.

Checks the trainer's gradient-accumulation contract on real ranks: after a micro-step inside
`gradient_sync(..., sync=False)` each rank holds its own gradients (no all-reduce happened); after
the step's last micro-batch (`sync=True`) every rank holds the same (averaged) gradients. Exits
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


def main(model_json: str) -> int:
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train.parallel import gradient_sync, wrap_for_training

    dist.init_parallel_env()
    rank = dist.get_rank()
    config = MgenVLConfig.from_pretrained(model_json)
    paddle.seed(0)
    model = MgenVLForCausalLM(config)
    module, _ = wrap_for_training(model, None, dist.get_world_size())
    n = config.visual.n_queries
    rng = np.random.default_rng(rank)  # each rank its own data

    def micro_step(sync: bool):
        words = rng.integers(100, 1000, size=6)
        ids = [config.image_start_id] + [config.image_pad_id] * n + [config.image_end_id] + words.tolist()
        labels = [-100] * (n + 2) + words.tolist()
        images = paddle.to_tensor(rng.standard_normal((1, 3, config.visual.image_size,
                                                       config.visual.image_size)).astype("float32"))
        with gradient_sync(module, sync):
            module(paddle.to_tensor([ids]), images=images, labels=paddle.to_tensor([labels])).backward()

    params = [p for p in model.parameters() if not p.stop_gradient]
    grads = lambda: np.concatenate([p.grad.numpy().ravel() for p in params])  # noqa: E731

    micro_step(sync=False)
    first = gathered(grads())
    assert not np.allclose(first[0], first[1]), "gradients were all-reduced on a no-sync micro-step"
    micro_step(sync=True)
    after = gathered(grads())
    np.testing.assert_array_equal(after[0], after[1], err_msg="ranks differ after the synced micro-step")
    if rank == 0:
        print(json.dumps({"grad_sync_probe": "passed", "params": len(params)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
