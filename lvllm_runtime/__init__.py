"""lvllm runtime: topology, checkpoints, quantization, the expert store, planning, the CPU engine and the vLLM plugin.

Nothing here imports typer or rich; heavy imports (torch, vllm) happen inside the functions that need them.
"""

__version__ = "0.1.0"
