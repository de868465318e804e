"""What each linear layer does in the model's training forward, seen on fake tensors (fake_run.py, one decoder
layer of each kind): a plain projection, a router or gate, a module that never runs or that no gradient reaches, one
whose output is not `input @ weight.T`, or one whose weight the model reads outside the module's forward
(targets.py decides `all-linear` from these roles)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .anatomy import decoder_layers
from .fake_run import cut_or_whole, fake_run, layer_kinds

READ_OUTSIDE = "its weight is read outside its forward"
NOT_PLAIN = "not a plain projection: its output is not input x weight"
NO_GRADIENT = "no gradient reaches it: its output only picks (top-k indices, masks), the logits do not depend on it"
ROUTING = {"_softmax", "_log_softmax", "topk"}
"""aten ops whose input is routing scores."""
PROBE_TOKENS = 8
"""The probe's sequence length."""
SELECTION = {"topk", "sort", "argsort", "argmax", "argmin", "max", "min", "kthvalue", "multinomial"}
"""aten ops whose integer output is the positions their input picks."""
PASS_THROUGH = {"_to_copy", "view", "_unsafe_view", "reshape", "clone", "contiguous", "t", "transpose", "alias"}
"""aten ops whose output is still the module's output, cast or viewed (so are those whose output has its shape)."""


def probe(model: nn.Module, candidates: list[str]) -> dict[str, str]:
    """Each candidate's role in one training forward: "projection", "router or gate", "never runs in the forward",
    or READ_OUTSIDE, NOT_PLAIN, NO_GRADIENT."""
    layers = decoder_layers(model)
    kinds = layer_kinds(model, layers)
    watch, stands_for = cut_or_whole(model, layers, kinds, lambda kept: _watch(model, layers, kinds, kept, candidates))
    modules = dict(model.named_modules())
    roles = {}
    for name in candidates:
        seen = _representative(name, stands_for)
        if seen in watch.read_outside:
            roles[name] = READ_OUTSIDE
        elif seen not in watch.ran:
            roles[name] = "never runs in the forward"
        elif seen in watch.routers or (seen in watch.gated and _width(modules[name]) == 1):
            roles[name] = "router or gate"
        elif seen in watch.not_plain:
            roles[name] = NOT_PLAIN
        elif seen not in watch.reach_logits and seen in watch.feed_integers:
            roles[name] = NO_GRADIENT
        else:
            roles[name] = "projection"
    return roles


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    """`model` in training or eval mode inside, every module's own mode restored on exit."""
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _watch(model: nn.Module, layers: list[str], kinds: list, kept: list[int], candidates: list[str]):
    """One training forward of `model` cut to the layers `kept`, the candidates watched; the watch and which
    layer stands for which."""
    # A layer that does not run stands for the first of its kind: the same relative path has the same role.
    stands_for = {layers[i]: layers[i if i in kept else kinds.index(kinds[i])] for i in range(len(layers))}
    observed = {_representative(c, stands_for) for c in candidates}
    modules = dict(model.named_modules())
    watch = _Watch()
    with (
        # The forward training runs (RWKV rescales its weights in place when it runs in eval mode).
        _mode(model, training=True),
        # Tensors the forward makes run on the fake CPU, also where peft is attaching under `torch.device("meta")`.
        torch.device("cpu"),
        # Roles do not depend on dtypes: every float one fp32, so no family's dtype rule can stop the forward.
        fake_run(model, layers, kept, "cpu", uniform=torch.float32) as _,
        watch,
        contextlib.ExitStack() as hooks,
    ):
        for name in observed:
            module = modules[name]
            watch.weights[id(module.weight)] = name
            started = module.register_forward_pre_hook(lambda m, a, name=name: watch.running.add(name))
            handle = module.register_forward_hook(
                lambda m, a, out, name=name: watch.produced(name, out, _plain_output(m, a, out))
            )
            hooks.callback(started.remove)
            hooks.callback(handle.remove)
        ids = torch.zeros((1, PROBE_TOKENS), dtype=torch.long, device="cpu")
        with torch.enable_grad():
            watch.reaching(model(input_ids=ids, use_cache=False).logits)
    return watch, stands_for


def _representative(name: str, stands_for: dict[str, str]) -> str:
    for layer, first in stands_for.items():
        if name.startswith(layer + "."):
            return first + name[len(layer) :]
    return name


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.nf


def _plain_output(module: nn.Module, args: tuple, output) -> bool:
    """Whether `output` has the shape of `input @ weight.T`, which an adapter's `B(A(input))` is added to."""
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    if not inputs or not isinstance(output, torch.Tensor):
        return True
    return tuple(output.shape) == (*inputs[0].shape[:-1], _width(module))


class _Watch(TorchDispatchMode):
    """Which watched modules ran, what their outputs went into, and whose weights were read outside them."""

    def __init__(self):
        super().__init__()
        self.weights: dict[int, str] = {}
        """id of a watched module's weight (the fake tensor the run sees) -> the module."""
        self.running: set[str] = set()
        self.read_outside: set[str] = set()
        self.ran: set[str] = set()
        self.routers: set[str] = set()
        self.gated: set[str] = set()
        self.not_plain: set[str] = set()
        self.leaves: dict[int, tuple[str, torch.Tensor]] = {}
        self.derived: dict[int, tuple[set[str], torch.Tensor]] = {}
        """id of a tensor computed from watched modules' outputs, through any ops -> those modules."""
        self.feed_integers: set[str] = set()
        self.reach_logits: set[str] = set()
        self.outputs: dict[int, tuple[str, torch.Tensor]] = {}

    def produced(self, name: str, output, plain: bool):
        """Notes what the module returned; returns it marked, where it is a float tensor, so that `reaching` can
        tell whether it reaches the logits."""
        self.running.discard(name)
        self.ran.add(name)
        if not plain:
            self.not_plain.add(name)
        if not isinstance(output, torch.Tensor):
            self.routers.add(name)
            return None
        if output.is_floating_point():
            # A zero leaf added to the output: the logits reach it where they reach the output.
            marker = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self.leaves[id(marker)] = (name, marker)
            output = output + marker
        self.outputs[id(output)] = (name, output)
        self.derived[id(output)] = ({name}, output)
        return output

    def _derive(self, op: str, args, kwargs, result) -> None:
        """What `result` is computed from; modules whose outputs pick something (a selection's indices)."""
        sources: set[str] = set()
        for arg in torch.utils._pytree.tree_leaves((args, kwargs)):
            entry = self.derived.get(id(arg)) if isinstance(arg, torch.Tensor) else None
            if entry is not None and entry[1] is arg:
                sources |= entry[0]
        if not sources:
            return
        for out in torch.utils._pytree.tree_leaves(result):
            if not isinstance(out, torch.Tensor):
                continue
            if out.is_floating_point():
                self.derived[id(out)] = (sources, out)
            elif op in SELECTION:
                self.feed_integers |= sources

    def reaching(self, logits: torch.Tensor) -> None:
        """The watched modules whose output the logits depend on through differentiable ops (a gradient reaches
        them): an adapter on any other module would never learn."""
        seen, stack = set(), [logits.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            leaf = self.leaves.get(id(getattr(node, "variable", None)))
            if leaf is not None and leaf[1] is node.variable:
                self.reach_logits.add(leaf[0])
            stack.extend(next_node for next_node, _ in node.next_functions)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        op = func._schema.name.split("::")[-1]
        self._derive(op, args, kwargs, result)
        for arg in torch.utils._pytree.tree_leaves((args, kwargs)):
            weight_of = self.weights.get(id(arg)) if isinstance(arg, torch.Tensor) else None
            if weight_of is not None and weight_of not in self.running:
                self.read_outside.add(weight_of)
            owner = self.outputs.get(id(arg)) if isinstance(arg, torch.Tensor) else None
            if owner is None or owner[1] is not arg:
                continue
            name = owner[0]
            if op in ROUTING:
                self.routers.add(name)
            if op == "sigmoid":
                self.gated.add(name)
            elementwise = isinstance(result, torch.Tensor) and result.shape == arg.shape
            if isinstance(result, torch.Tensor) and (op in PASS_THROUGH or elementwise):
                self.outputs[id(result)] = (name, result)
        return result


def written_in_eval(model: nn.Module) -> list[str]:
    """The parameters `model`'s eval-mode forward writes into, seen on fake tensors (RWKV rescales its weights for
    inference whenever it switches to eval mode)."""
    layers = decoder_layers(model)
    try:
        return cut_or_whole(model, layers, layer_kinds(model, layers), lambda kept: _eval_writes(model, layers, kept))
    except Exception:  # noqa: BLE001 - a forward fake tensors cannot run shows no writes (resolve says it did not run)
        return []


def _eval_writes(model: nn.Module, layers: list[str], kept: list[int]) -> list[str]:
    parameters = dict(model.named_parameters())
    with (
        _mode(model, training=False),
        fake_run(model, layers, kept, "cpu", uniform=torch.float32) as (_, fakes),
        torch.device("cpu"),
    ):
        writes = _Writes({id(fake): name for name, fake in fakes.items() if name in parameters})
        with writes, torch.no_grad():
            model(input_ids=torch.zeros((1, PROBE_TOKENS), dtype=torch.long), use_cache=False)
    return sorted(writes.written)


class _Writes(TorchDispatchMode):
    """Which of the given tensors an op writes into."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.written: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for position, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[position] if position < len(args) else kwargs.get(argument.name)
            if isinstance(value, torch.Tensor) and id(value) in self.names:
                self.written.add(self.names[id(value)])
        return func(*args, **kwargs)
