"""Activation offload: what forward saves is a host copy, weights are not copied, and loss and gradients
equal the resident run's (with non-reentrant checkpointing, as training runs)."""

import torch
from test_loss import batch, loss_and_grads, tiny

from launcher.run.activation_offload import ActivationOffload


def test_offloaded_activations_give_the_resident_loss_and_gradients():
    inputs = batch(packed=True)
    for family in ("llama", "gemma2"):
        model = tiny(family)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        own_loss, own_grads = loss_and_grads(model, inputs, 30.0)
        ActivationOffload(torch.device("cpu")).install(model)
        loss, grads = loss_and_grads(model, inputs, 30.0)
        assert torch.equal(loss, own_loss)
        assert grads.keys() == own_grads.keys()
        for name, grad in grads.items():
            assert torch.equal(grad, own_grads[name]), name


def test_saved_tensors_are_copies_and_weights_stay():
    offload = ActivationOffload(torch.device("cpu"))
    weight = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(2, 4, requires_grad=True)
    packed = []

    def pack(tensor):
        packed.append(offload.pack(tensor))
        return packed[-1]

    with torch.autograd.graph.saved_tensors_hooks(pack, offload.unpack):
        y = (x @ weight).sigmoid().sum()
    y.backward()
    copies = [p for p in packed if isinstance(p, tuple)]
    assert any(p is weight for p in packed)  # the matmul's weight: not copied
    assert copies and all(host.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for _, host in copies)
    torch.testing.assert_close(x.grad, (torch.sigmoid(x @ weight) * (1 - torch.sigmoid(x @ weight))) @ weight.T)
