"""The rank's runtime, below the engines and the training loop: the device and precision it trains
on (device), its process groups and collectives (distributed), the learning-rate schedule
(schedule), the preflight checks of a multi-node job's nodes (preflight; nodes: their names and the
verdict, torch-free) and the faults tests inject (faults). Nothing here imports from launcher.train, launcher.engines or launcher.launch."""
