"""Autograd graph inspection shared by the distributed probe and the unit tests."""

import torch


def graph_node_types(tensor: torch.Tensor) -> set[str]:
    """Type names of every autograd node behind `tensor`."""
    seen, stack, types = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        types.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return types
