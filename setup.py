from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.split("#")[0].strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

setup(
    name="paddle_caption",
    version="0.1.0",
    description="PaddlePaddle-native Qwen-VL (Mgen-VL) ad-image captioning kit",
    packages=find_packages(include=["paddle_caption", "paddle_caption.*"]),
    python_requires=">=3.9",
    install_requires=requirements,
    entry_points={
        "console_scripts": [
            "paddle-caption-convert=paddle_caption.data.convert:main",
            "paddle-caption-make-data=paddle_caption.data.synthetic:main",
            "paddle-caption-analyze=paddle_caption.data.analyze:main",
            "paddle-caption-train=paddle_caption.train.cli:main",
            "paddle-caption-merge=paddle_caption.train.merge:main",
            "paddle-caption-predict=paddle_caption.serve.predict:main",
            "paddle-caption-evaluate=paddle_caption.eval.evaluate:main",
        ]
    },
)
