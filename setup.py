from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
TEST_ONLY = ("pytest", "httpx", "playwright")  # requirements.txt also pins the test tools
requirements = [
    line.split("#")[0].strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith(TEST_ONLY)
]

setup(
    name="paddle_caption",
    version="0.1.0",
    description="PaddlePaddle-native Qwen-VL (Mgen-VL) ad-image captioning kit",
    packages=find_packages(include=["paddle_caption", "paddle_caption.*"]),
    # The kit's own prompts, model architectures and run configs travel with the package, so an
    # installed kit finds them from any directory (paddle_caption/resources.py).
    # The caption service's web page is package data too.
    package_data={"paddle_caption": ["config/*.json", "config/*/*.json", "config/prompts/*.txt"],
                  "paddle_caption.serve": ["static/*"]},
    include_package_data=False,
    # 3.10: PEP 604 unions (`str | None`) in dataclass fields are evaluated at run time, and
    # matplotlib 3.10 requires it.
    python_requires=">=3.10",
    install_requires=requirements,
    entry_points={
        "console_scripts": [
            "paddle-caption-convert=paddle_caption.entry_points:convert",
            "paddle-caption-make-data=paddle_caption.entry_points:make_data",
            "paddle-caption-analyze=paddle_caption.entry_points:analyze",
            "paddle-caption-train=paddle_caption.entry_points:train",
            "paddle-caption-merge=paddle_caption.entry_points:merge",
            "paddle-caption-predict=paddle_caption.entry_points:predict",
            "paddle-caption-evaluate=paddle_caption.entry_points:evaluate",
            "paddle-caption-demo=paddle_caption.entry_points:demo",
            "paddle-caption-serve=paddle_caption.entry_points:serve",
            "paddle-caption-plan-memory=paddle_caption.entry_points:plan_memory",
            "paddle-caption-convert-checkpoint=paddle_caption.entry_points:convert_checkpoint",
            "paddle-caption-compare-modes=paddle_caption.entry_points:compare_modes",
            "paddle-caption-curate=paddle_caption.entry_points:curate",
            "paddle-caption-curate-demo=paddle_caption.entry_points:curate_demo",
            "paddle-caption-scst-demo=paddle_caption.entry_points:scst_demo",
            "paddle-caption-gpu-check=paddle_caption.entry_points:gpu_check",
            "paddle-caption-export=paddle_caption.entry_points:export",
        ]
    },
)
