"""Delta methods: what trains on the frozen base and what a patch of it holds. Each method is one module here
that defines its `Method`s (core.py: the protocol) in `REGISTER`; `METHODS` is the one list of them, found
by looking at this package's modules. Nothing outside this package tests a method's name: the planner,
the patch format, the bank, the run defaults and the CLI ask the registry."""

from .core import METHODS, Method, MethodSpec, apply_method, delta_shapes, detach_all, get_method

__all__ = ["METHODS", "Method", "MethodSpec", "apply_method", "delta_shapes", "detach_all", "get_method"]
