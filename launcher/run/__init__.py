"""What a training run needs around the loop: the Accelerator, metrics, trackers, evaluation, preemption, failures."""
