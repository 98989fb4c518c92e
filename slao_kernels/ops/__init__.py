"""One file per op: Triton kernels (CUDA), launchers, registration, functional.

The functionals are re-exported by ``slao_kernels``; import the op modules
themselves (``slao_kernels.ops.lora_linear``) for launchers and kernels.
"""
