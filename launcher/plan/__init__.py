"""What `ftl plan` works out before anything runs: the memory model (pure arithmetic) and the
report it prints. No torch."""
