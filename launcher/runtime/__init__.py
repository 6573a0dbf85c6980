"""The rank's runtime, below the engines and the training loop: the device and precision it trains
on (device), its process groups and collectives (distributed), and the learning-rate schedule
(schedule). Nothing here imports from launcher.train, launcher.engines or launcher.launch."""
