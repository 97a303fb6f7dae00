from setuptools import find_packages, setup

setup(
    name="alignclip-kernels",
    version="0.1.0",
    description="Fused Triton kernels and a training package for AlignCLIP on one GPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["alignclip_kernels", "alignclip_kernels.*", "alignclip", "alignclip.*"]),
    package_data={"alignclip": ["model_configs/*.json"]},
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "triton>=3.0; platform_system == 'Linux'",
        "open_clip_torch>=2.24",
        "einops>=0.7",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=7.4", "pytest-benchmark>=4.0", "hypothesis>=6.80"],
    },
    entry_points={"console_scripts": ["alignclip=alignclip.cli:main"]},
)
