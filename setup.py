"""swav-jax: SwAV self-supervised pretraining in JAX/Flax."""

from setuptools import find_packages, setup

# One range for jax and its TPU extra: jax[tpu] pins the libtpu release built for that
# jax, so with jax already installed pip adds the libtpu of the installed version.
JAX_VERSIONS = ">=0.10.2,<0.13"

setup(
    name="swav-jax",
    version="0.1.0",
    description="SwAV (Caron et al., 2020) self-supervised pretraining in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["swav_jax", "swav_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        f"jax{JAX_VERSIONS}",
        "flax>=0.10",
        "optax>=0.2.6",
        "grain>=0.2.10",
        # tfds.data_source reads ArrayRecord without TensorFlow.
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "pillow>=10",
        # The embedded demo data set (digits) ships with scikit-learn.
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "absl-py>=1.4",
    ],
    extras_require={
        "test": ["pytest>=8"],
        # Only for `swav-jax convert` and the PyTorch baselines in bench/.
        "torch": ["torch>=2.3"],
        # libtpu (~700 MB): training on Cloud TPU, and compiling for TPU slices on any
        # machine (swav_jax.plan, docs/TPU.md).
        "tpu": [f"jax[tpu]{JAX_VERSIONS}"],
    },
    entry_points={"console_scripts": ["swav-jax=swav_jax.cli:main"]},
)
