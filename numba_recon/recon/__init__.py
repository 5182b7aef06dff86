"""The training loop: :mod:`.engine` runs the stages (read, batch, forward, loss, adjoint,
reduce, step, checkpoint, evaluate, report) in order for both half sets."""
