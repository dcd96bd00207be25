"""What the recipe's loss and optimizer flags and the evaluation's options change in what is computed, checked
against a computation written out here: a training step's loss and update, evaluate()'s mirror TTA, top-5 and
confusion matrix, and the checkpoint an epoch saves while the next epoch's first step runs.

(The optimizer's settings as SGD holds them and the learning rate step by step, warmup and schedule, are checked in
test_resume.py; --eval-only against a direct computation on a trained network in test_eval.py.)"""
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from test_train import tiny_args
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import train
from cifar.batches import BatchOptions, EvalBatches
from model import build_model
from training import flags, recording
from training.evaluation import evaluate
from training.optimization import make_optimization

CPU = torch.device("cpu")


def reference_sgd_steps(net: nn.Module, batches: list, recipe: flags.Recipe) -> list[torch.Tensor]:
    """The losses of SGD steps taken by hand, as torch.optim.SGD documents them, at a constant rate: the loss is
    cross-entropy with the recipe's label smoothing; its gradient, plus weight decay times the weight, goes into the
    momentum buffer, and the step follows the buffer, or with Nesterov that sum plus momentum times the buffer."""
    buffers, losses = {}, []
    for inputs, labels in batches:
        loss = F.cross_entropy(net(inputs), labels, label_smoothing=recipe.label_smoothing)
        net.zero_grad()
        loss.backward()
        losses.append(loss.detach())
        with torch.no_grad():
            for parameter in net.parameters():
                gradient = parameter.grad + recipe.weight_decay * parameter
                if recipe.momentum:
                    previous = buffers.get(parameter)
                    buffer = gradient if previous is None else recipe.momentum * previous + gradient
                    buffers[parameter] = buffer
                    gradient = gradient + recipe.momentum * buffer if recipe.nesterov else buffer
                parameter -= recipe.lr * gradient
    return losses


@pytest.mark.parametrize("recipe_flags", [
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, label_smoothing=0.2),
    dict(lr=0.3, momentum=0.5, nesterov=False, weight_decay=0.01, label_smoothing=0.0),
    dict(lr=0.1, momentum=0.0, nesterov=True, weight_decay=0.0, label_smoothing=0.1),
], ids=["nesterov-smoothed", "heavy-ball-decayed", "plain-smoothed"])
def test_a_training_step_computes_the_recipes_loss_and_sgd_update(recipe_flags):
    """Each flag of the loss and the optimizer is one a step is seen to follow: a step that dropped any of them
    (the smoothing, the rate, momentum, Nesterov, the decay) would end on other losses or weights."""
    # One epoch of three steps, where a cosine schedule or a warmup would move the rate a long way from lr.
    recipe = flags.Recipe(**recipe_flags, epochs=1, warmup_epochs=0.0, schedule="constant")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    by_hand = copy.deepcopy(net)
    batches = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 4])), (torch.randn(4, 6), torch.tensor([3, 3, 1, 0])),
               (torch.randn(4, 6), torch.tensor([2, 4, 0, 1]))]
    training = make_optimization(net, recipe, len(batches), CPU, None)
    losses = [training.step(net, inputs, labels)[0] for inputs, labels in batches]
    expected = reference_sgd_steps(by_hand, batches, recipe)
    torch.testing.assert_close(losses, expected)
    for parameter, expected_parameter in zip(net.parameters(), by_hand.parameters()):
        torch.testing.assert_close(parameter, expected_parameter)


def reference_evaluation(net: nn.Module, batches: EvalBatches, mirror: bool) -> dict:
    """Summed loss, top-1 and top-5 hits and the confusion matrix, from the probabilities of each image, averaged
    with those of its left-right mirror image when asked."""
    probabilities, labels = [], []
    with torch.no_grad():
        for inputs, batch_labels in batches:  # batch by batch, as evaluate() takes them: the same sums
            batch_probabilities = net(inputs).softmax(1)
            if mirror:
                batch_probabilities = (batch_probabilities + net(torch.flip(inputs, [3])).softmax(1)) / 2
            probabilities.append(batch_probabilities)
            labels.append(batch_labels)
    probabilities, labels = torch.cat(probabilities), torch.cat(labels)
    top5 = probabilities.topk(5, dim=1).indices
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    for label, predicted in zip(labels.tolist(), top5[:, 0].tolist()):
        confusion[label, predicted] += 1
    return {"loss": F.nll_loss(probabilities.log(), labels, reduction="sum").item(),
            "top1": int((top5[:, 0] == labels).sum()), "top5": int((top5 == labels[:, None]).any(1).sum()),
            "images": len(labels), "confusion": confusion}


@pytest.mark.parametrize("tta", [False, True])
def test_evaluation_scores_each_image_and_with_tta_its_mirror_image_too(tta):
    """A network that tells left from right, on images that are not symmetric, so that the mirror changes every
    figure: an image averaged with itself, or with its upside-down image, would not give these."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (23,))
    batches = EvalBatches(images, labels, 10, BatchOptions(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
    totals, confusion = evaluate(net, batches, None, tta=tta, num_classes=10)
    expected = reference_evaluation(net, batches, mirror=tta)
    assert totals[0].item() == pytest.approx(expected["loss"], rel=1e-5)
    assert totals[1:].tolist() == [expected["top1"], expected["top5"], expected["images"]]
    assert torch.equal(confusion, expected["confusion"])
    # What makes the test able to tell: the mirror moves the loss and top-1 is not top-5.
    other = reference_evaluation(net, batches, mirror=not tta)
    assert other["loss"] != pytest.approx(expected["loss"], rel=1e-3)
    assert expected["top1"] < expected["top5"] < expected["images"]


def test_the_checkpoint_of_an_epoch_holds_its_last_weights_while_the_next_epoch_trains(cifar10_dir, tmp_path,
                                                                                         monkeypatch):
    """last.pt is copied from the network on the writer's thread while the next epoch's first step runs; that
    step's update must wait for the copy. Here the copy is held back until that update has happened, or for 2 s
    when (as it should) the update waits for it; the run is then stopped (Ctrl-C), and last.pt must hold the
    weights and momenta of the end of epoch 1 exactly."""
    subset, batch_size = 256, 64
    steps_per_epoch = subset // batch_size
    updates, held, updated = 0, threading.Event(), threading.Event()
    end_of_epoch: dict = {}

    def after_update(optimizer, args, kwargs) -> None:
        nonlocal updates
        updates += 1
        parameters = optimizer.param_groups[0]["params"]
        if updates == steps_per_epoch:
            end_of_epoch["parameters"] = [parameter.detach().clone() for parameter in parameters]
            end_of_epoch["momenta"] = [optimizer.state[parameter]["momentum_buffer"].clone()
                                       for parameter in parameters]
        elif updates == steps_per_epoch + 1:  # the next epoch's first update
            updated.set()
            raise KeyboardInterrupt

    real_cpu_copy = recording.cpu_copy

    def held_back_cpu_copy(state, reuse=None):
        if threading.current_thread() is not threading.main_thread() and not held.is_set():
            held.set()  # the first copy made off the training thread: epoch 1's weights
            updated.wait(timeout=2)
        return real_cpu_copy(state, reuse)

    monkeypatch.setattr(recording, "cpu_copy", held_back_cpu_copy)
    hook = register_optimizer_step_post_hook(after_update)  # every optimizer's: the run's is made inside
    try:
        argv = tiny_args(cifar10_dir, tmp_path, epochs=2, subset=subset)
        assert train.main("cifar10", argv) == 130
    finally:
        hook.remove()
    assert held.is_set() and updates == steps_per_epoch + 1
    last = torch.load(tmp_path / "cifar10" / "cnn_base" / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    net = build_model("cnn_base", 10)
    net.load_state_dict(last["model"])
    momenta = [state["momentum_buffer"] for _, state in sorted(last["optimizer"]["state"].items())]
    assert len(end_of_epoch["parameters"]) == len(momenta) == len(list(net.parameters()))
    moved = [index for index, (saved, expected) in enumerate(zip(net.parameters(), end_of_epoch["parameters"]))
             if not torch.equal(saved, expected)]
    assert moved == [], "last.pt holds weights that an update after the end of epoch 1 changed"
    moved = [index for index, (saved, expected) in enumerate(zip(momenta, end_of_epoch["momenta"]))
             if not torch.equal(saved, expected)]
    assert moved == [], "last.pt holds momenta that an update after the end of epoch 1 changed"
