"""Resource package, no code: the C++/CUDA kernel sources shipped as `edge_tune.cpp_ext`, compiled on first use
(see edge_tune/resources.py and edge_tune/kernels.py)."""
