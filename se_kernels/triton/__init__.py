"""The Triton backend: kernels.py (the @triton.jit kernels), launch.py (plans and grids),
op.py (the torch.library ops). Importing this package needs Triton; se_kernels.ops imports it
only when Triton is installed."""
