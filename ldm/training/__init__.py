"""Training plumbing shared by every stage: the guarded optimizer step, callbacks, checkpoint I/O, trainer set-up."""
