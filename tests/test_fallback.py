"""Without the C++ extension the package still imports, warns once, and the CPU
ops run the reference."""

import subprocess
import sys

CODE = r"""
import sys, warnings
sys.modules["slao_kernels._C"] = None  # makes `import slao_kernels._C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import slao_kernels
    from slao_kernels.reference import lora_linear_ref
native = [w for w in caught if "C++ CPU kernels are not available" in str(w.message)]
assert len(native) == 1, [str(w.message) for w in caught]
assert slao_kernels.NATIVE_CPU is False
x, w = torch.randn(5, 12), torch.randn(7, 12)
A, B = torch.randn(3, 12, requires_grad=True), torch.randn(7, 3, requires_grad=True)
y = slao_kernels.lora_linear(x, w, None, A, B, 0.5)
torch.testing.assert_close(y, lora_linear_ref(x, w, None, A, B, 0.5)[0])
y.sum().backward()
# d(sum y)/dA = 0.5·Bᵀ·1·x and d/dB = 0.5·1ᵀ·(x·Aᵀ), written out
ones = torch.ones(5, 7)
torch.testing.assert_close(A.grad, 0.5 * B.detach().t() @ ones.t() @ x)
torch.testing.assert_close(B.grad, 0.5 * ones.t() @ (x @ A.detach().t()))
print("FALLBACK-OK")
"""


def test_missing_extension_falls_back_to_reference_with_one_warning():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "FALLBACK-OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
