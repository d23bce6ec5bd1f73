"""Install Loong. CPU torch first: `pip install torch==2.13.0` (see README)."""
from setuptools import find_packages, setup

setup(
    name="loong",
    version="0.1.0",
    description="Long-context LLM serving with elastic sequence parallelism",
    python_requires=">=3.10",
    packages=find_packages(include=["loong", "loong.*"]),
    package_data={"loong": ["ARCHITECTURE.md", "sched/presets/*.json", "sched/presets/*.md",
                            "serve/console/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "gguf>=0.10",
        "safetensors",
        "tokenizers>=0.19",
        # Chat templates are Jinja2 programs; a sandboxed Jinja2 renders them exactly.
        "jinja2>=3.1",
        # The generated code in loong/v1 checks these runtimes (>= the generator's).
        "grpcio>=1.85.1",
        "protobuf>=7.35.1",
        # The standard grpc.health.v1 service and server reflection (official grpc packages).
        "grpcio-health-checking>=1.85.1",
        "grpcio-reflection>=1.85.1",
        # The OpenAI-compatible HTTP API: the ASGI stack vLLM and SGLang serve it with
        # (request routing, SSE streaming, disconnect detection, TLS) instead of our own.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        # `loong bench --backend openai` streams from any OpenAI-compatible server.
        "httpx>=0.27",
    ],
    extras_require={
        # grpcio-tools is pinned: the test that generated code is current compares its output.
        # hypothesis drives the fuzzing tier (generated requests against a live server).
        "test": ["pytest", "transformers>=4.45", "accelerate", "sentencepiece",
                 "grpcio-tools==1.85.1", "hypothesis>=6.100",
                 # The HTTP API is tested with OpenAI's own client; the console in a real
                 # headless chromium driven by selenium (chromium itself comes from apt).
                 "openai>=1.40", "selenium>=4.20"],
        "gpu": ["flash-attn"],
        # Only the experiments' PNG plots; they print tables and write JSON without it.
        "plots": ["matplotlib"],
    },
    entry_points={"console_scripts": ["loong=loong.cli:main"]},
)
